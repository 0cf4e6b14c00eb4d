# Two entry points on a fresh machine (see README):
#   make main   install, then train + evaluate on the shared IQ-OTH/NCCD data
#   make test   install, then run the test suite (all of it: what CI runs)
#   make test-fast  the fast tier while developing (pytest -m "not slow", about 70 s of CPU)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch/torchvision: this release pair lies on our build machines' local disk (pip takes it from there)
TORCH  ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= test
DATA   ?= ../shared/data/iqothnccd
RUN    ?= runs/iqothnccd
# The main job is the 5-fold cross-validated ensemble, from random initialisation on a 2-core CPU:
# 224 px, 12 epochs and batch 32 per member (224 px against 128 px / 20 epochs: malignant ROC-AUC
# 0.980 vs 0.967, specificity at 0.95 sensitivity 0.947 vs 0.912, balanced accuracy +0.042
# [-0.027, +0.105]: docs/ablations.md), bf16 where the CPU has native bf16 (--amp auto; fp32
# elsewhere, about 2.5x slower). --window: how IQ-OTH/NCCD's JPEGs were rendered (docs/window.md),
# so DICOM input is rendered alike. --jobs 2: two members train side by side, each on its share of
# the cores (on 2 cores: 61.5 min for the whole job against about 70 one member at a time, the same
# members bit for bit; README; on a GPU the members train one at a time). --fusion texture: the
# ensemble's probabilities are averaged with a texture head's (lungcad.models.fusion; +0.11 to +0.13
# balanced accuracy over the network alone and +0.04 to +0.07 over the texture baseline, paired, in
# four 3-fold runs; with 5 folds, this recipe (M224F, fp32): balanced accuracy 0.819 [0.766, 0.868],
# level with the texture baseline on three classes (+0.012 [-0.018, +0.044]), 8 false positives
# against its 21 on malignant at matched sensitivity: README, docs/ablations.md). The faster recipe
# of the previous version:
#   make main TRAIN_ARGS='--folds 5 --image-size 128 --epochs 20 --batch-size 32 --lr 0.0015 --window=195,480'
TRAIN_ARGS ?= --folds 5 --jobs 2 --image-size 224 --epochs 12 --batch-size 32 --lr 0.0015 --window=195,480 \
              --fusion texture
STAMP  := $(VENV)/.installed-$(EXTRAS)
# The web app's image viewer: Cornerstone3D bundled by esbuild from web/viewer (npm) into the package's
# static files. Generated, not tracked; `pip install -e .` serves it from src/, a wheel built after it ships it.
VIEWER := src/lungcad/web/static/viewer/viewer.js
VIEWER_SRC := web/viewer/package.json web/viewer/package-lock.json web/viewer/build.mjs $(wildcard web/viewer/src/*.js web/viewer/src/*/*.js)

.PHONY: install main test test-fast bench clean viewer

# The viewer needs npm (Node.js 18+). Without it `make install` warns and goes on (training and the CLI do
# not need it; the study page then says the viewer is not installed); `make test` requires it.
install: $(STAMP)
	@if command -v npm >/dev/null 2>&1; then $(MAKE) --no-print-directory viewer; \
	else echo "make: npm not found: the web app's image viewer is not built (install nodejs and npm, then make viewer)" >&2; fi

viewer: $(VIEWER)

$(VIEWER): $(VIEWER_SRC)
	cd web/viewer && npm ci --no-audit --no-fund --ignore-scripts && npm run build
	touch $@

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

# The main job: audit the data, train the cross-validated fold ensemble from random initialisation
# (ImageNet weights cannot be downloaded here), evaluate it on its pooled out-of-fold predictions
# with the baselines on the same folds.
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
	$(MAKE) --no-print-directory viewer
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# The fast tier: unit tests on tiny synthetic images and random-init models, without the tests that
# train, serve or take more than ~5 s (marked slow). Not a substitute for `make test` before a merge.
test-fast: install
	$(BIN)/python -m pytest -m "not slow"

# Speed benchmarks (minutes; run on an otherwise idle machine). The web load test needs a run:
#   $(BIN)/python benchmarks/load_web.py --run $(RUN)
bench: install
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_inference.py
	$(BIN)/python benchmarks/bench_distributed.py

clean:
	rm -rf $(VENV) runs .pytest_cache web/viewer/node_modules src/lungcad/web/static/viewer
