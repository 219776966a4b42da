# One-command entry points. Everything installs into .venv with torch pinned to the CPU wheel
# through constraints.txt, so no resolver ever pulls a CUDA torch or torchvision.
VENV    ?= .venv
PYTHON  ?= python3
BIN      = $(VENV)/bin
STAMP    = $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
export PYTHONHASHSEED := 0

.PHONY: install repro quick test test-fast ui bench paper services services-stop

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0+cpu
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## run the whole pipeline on the embedded default (offline, CPU)
repro: install
	@test -d .git || (git init -q && git add -A && git commit -qm "initial import" || true)
	@test -d .dvc || (dvc init -q && dvc config core.analytics false)
	dvc repro

## a first look in minutes: the headline row of each family at one setting, one seed, shorter FP training
## (presets/quick.args), into the same reports/ and MLflow views; params.yaml is left as it was
quick: install
	@test -d .git || (git init -q && git add -A && git commit -qm "initial import" || true)
	@test -d .dvc || (dvc init -q && dvc config core.analytics false)
	@cp params.yaml .params.before-quick.yaml; dvc exp run $$(cat presets/quick.args); rc=$$?; \
	  mv .params.before-quick.yaml params.yaml; exit $$rc

## the test suite (one process; includes an end-to-end `dvc repro` on a miniature params file)
test: install
	$(BIN)/ruff check pipeline stages tests bench
	$(BIN)/python -m pytest -q tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

## MLflow dashboard on http://127.0.0.1:5000
ui: install
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server \
	  --backend-store-uri sqlite:///mlflow.db --default-artifact-root ./mlartifacts \
	  --host 127.0.0.1 --port 5000 --workers 1

## local PostgreSQL + S3 (moto mock, or PIPELINE_S3_ENDPOINT) + MLflow server on 127.0.0.1, state in data/services;
## then `source data/services/env` (README "Scaling out")
services: install
	$(BIN)/python -m pipeline.services start

services-stop: install
	$(BIN)/python -m pipeline.services stop

## benchmarks (print measured ratios; not part of the tests)
bench: install
	$(BIN)/python bench/stage_times.py
	$(BIN)/python bench/quant_core.py

## the papers' schedules (MPQ-DM QAT 800 x 20 steps, r=32; FP4DiT 2500 AdaRound iterations): a GPU job
paper: install
	dvc exp run -n paper $$(cat presets/paper.args)
