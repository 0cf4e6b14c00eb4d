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
# The main job trains from random initialisation on a 2-core CPU: 128 px and 30 epochs keep it under
# 30 minutes there (224 px full fine-tuning runs at ~5.5 img/s, i.e. ~2 min an epoch). With ImageNet
# weights or a GPU, use the lungcad defaults (224 px): make main TRAIN_ARGS=
TRAIN_ARGS ?= --image-size 128 --epochs 30 --patience 10
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
	bash scripts/install-system-deps.sh
	mkdir -p $(dir $(RUN))
	$(BIN)/lungcad audit $(DATA) --json $(RUN).audit.json --no-progress
	$(BIN)/lungcad train --data $(DATA) --out $(RUN) --pretrained none $(TRAIN_ARGS)
	$(BIN)/lungcad evaluate $(RUN)
	@echo "report: $(RUN)/report.html"

# system packages for the browser and PostgreSQL tests (chromium, postgresql; skipped when not root)
test: install
	bash scripts/install-system-deps.sh
	$(BIN)/python -m pytest

# Speed benchmarks (minutes; run on an otherwise idle machine). The web load test needs a run:
#   $(BIN)/python benchmarks/load_web.py --run $(RUN)
bench: install
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_inference.py
	$(BIN)/python benchmarks/bench_distributed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
