# One command each: `make repro` (set up + run the default pipeline),
# `make test` (set up + run the tests). Both create .venv when missing and
# reinstall only when pyproject.toml changes.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)

.PHONY: setup repro test bench ui regress bless aggregate clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

repro: setup
	dvc repro
	@echo "results: reports/comparison.md  |  runs: make ui"

test: setup
	python -m pytest

# the regression gate: compare reports/comparison.json with regression/reference.json
regress: setup
	python -m dtm_core.regress

# make the current run the new reference (commit regression/reference.json on purpose)
bless: setup
	python -m dtm_core.regress --bless

# mean +- std over training seeds of the pipeline runs in MLflow
aggregate: setup
	python -m dtm_core.aggregate

bench: setup
	python benchmarks/step_overhead.py

ui: setup
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf data/prepared models task_vectors partition samples plots reports metrics merge .dtm mlflow.db mlartifacts
