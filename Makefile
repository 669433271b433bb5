# One command each: `make repro` (set up + run the default pipeline),
# `make test` (set up + run the tests). Both create .venv when missing and
# reinstall only when pyproject.toml changes.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)

FASHION_DIR := /usr/share/datasets/fashion-mnist

.PHONY: setup repro test lint bench ui regress seeds study base base-fashion fashion fashion-lrs fashion-pilot fashion-seeds fashion-data profile clean

setup: $(STAMP) fashion-data

# Fashion-MNIST's IDX files from Debian (configs/fashion.yaml); only the Fashion regime needs them
fashion-data:
	@test -d $(FASHION_DIR) || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) ; } || \
	  echo "note: $(FASHION_DIR) is missing; the Fashion regime needs: apt-get install dataset-fashion-mnist"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

repro: setup
	dvc repro
	@echo "results: reports/comparison.md  |  runs: make ui"

# one worker per core, heaviest tests first (tests/conftest.py), one test at a time per worker
test: setup
	python -m pytest -n auto --dist load --maxschedchunk 1

lint: setup
	ruff check .

# the regression gate: the workspace's reports/comparison.json against the committed one
regress: setup
	python -m tools.regress

# the default comparison for training seeds 0, 1, 2 (DVC experiments) -> reports/seeds.{md,json}
seeds: setup
	python -m tools.seeds

# the Fashion-MNIST regime (docs/FASHION.md): training seed 0, or seeds 0-2, as DVC experiments
# on configs/fashion.yaml -> reports/seeds-fashion.{md,json}; needs base/fashion-unet (make base-fashion)
fashion: setup
	python -m tools.seeds --config configs/fashion.yaml --label fashion --seeds 0

# before the verdict seeds (docs/FASHION.md): the lrs on validation, then the pilot that sizes the sample count
fashion-lrs: setup
	python -m tools.sweep finetune.lr 1e-4 5e-5 2e-4 5e-4 --config configs/fashion.yaml --label fashion \
	  -S evaluate.seed=1 -S evaluate.reference=validation -S finetune.shared_lr=null \
	  -S evaluate.num_samples=4000 -S evaluate.heldout_images=250 \
	  -S 'controls.models=[]' -S 'analysis.lambdas=[]' -S analysis.gradient_bins=0

fashion-pilot: setup
	python -m tools.seeds --config configs/fashion.yaml --label fashion --seeds 100 \
	  -S 'controls.models=[]' -S 'analysis.lambdas=[]' -S analysis.gradient_bins=0
	python -m tools.fashion --pilot 100 --out docs/results/fashion_pilot.json

fashion-seeds: setup
	python -m tools.seeds --config configs/fashion.yaml --label fashion

# the paper's ablations and loss-reweighting baselines at small scale (DVC experiments) -> reports/study.{md,json,png}
study: setup
	python -m tools.study

# regenerate the shipped digits base (base/digits-unet) bit for bit: 9 min 33 s on 2 cores, CPU not recorded (base/README.md)
base: setup
	python -m tools.make_base

# train base/fashion-unet to its validation-loss plateau; resumes from base/fashion-unet.state/ (docs/FASHION.md)
base-fashion: setup
	python -m tools.make_base --config configs/fashion.yaml --until-plateau

bench: setup
	python benchmarks/step_overhead.py

# where the default run's time goes, per stage and phase: a py-spy profile of a forced `dvc repro`
profile: setup
	python -m pip install --quiet 'py-spy>=0.3.14'
	mkdir -p .dtm && py-spy record --format raw --rate 20 --subprocesses -o .dtm/profile.txt -- dvc repro -f
	python benchmarks/profile_run.py .dtm/profile.txt --rate 20 --timings timings --out docs/results/profile_default.json

ui: setup
	python -m tools.ui

clean:
	rm -rf data/prepared models task_vectors samples evaluation merge/search reports/figures timings .dtm mlflow.db mlartifacts
