# Two entry points on a fresh machine (see README):
#   make main   install, then train + evaluate on the shared IQ-OTH/NCCD data
#   make test   install, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch/torchvision: this release pair lies on our build machines' local disk (pip takes it from there)
TORCH  ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= test
DATA   ?= ../shared/data/iqothnccd
RUN    ?= runs/iqothnccd
STAMP  := $(VENV)/.installed-$(EXTRAS)

.PHONY: install main test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

# The main job: audit the data, train from random initialisation (ImageNet weights cannot be
# downloaded here), evaluate on the held-out test split.
main: install
	$(BIN)/lungcad audit $(DATA) --json $(RUN).audit.json --no-progress | tail -n 25
	$(BIN)/lungcad train --data $(DATA) --out $(RUN) --pretrained none $(TRAIN_ARGS)
	$(BIN)/lungcad evaluate $(RUN)

# system packages for the browser and PostgreSQL tests (chromium, postgresql; skipped when not root)
test: install
	bash scripts/install-system-deps.sh
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/bench_train.py

clean:
	rm -rf $(VENV) runs .pytest_cache
