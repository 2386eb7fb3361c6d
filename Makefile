# visionflow: `make help` lists the targets. The first target that needs it creates .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.DEFAULT_GOAL := help

help: ## show this help
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP) ## create or refresh the virtualenv (.venv) from requirements.lock

test: $(STAMP) ## run the test suite (unit + integration with real servers on 127.0.0.1)
	$(PY) -m pytest $(PYTEST_ARGS)

pipeline-run: $(STAMP) ## run the whole pipeline on this machine; ARGS='key=value ...' overrides
	$(VENV)/bin/visionflow pipeline run $(ARGS)

compile: $(STAMP) ## write the compiled pipeline to pipelines/training.yaml
	$(VENV)/bin/visionflow pipeline compile -o pipelines/training.yaml

bench: $(STAMP) ## benchmarks: side-by-side comparisons, printed as ratios
	$(PY) -m benchmarks $(ARGS)

mlflow-ui: $(STAMP) ## serve the local MLflow store on http://127.0.0.1:5000
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/.visionflow/mlflow.db --host 127.0.0.1 --port 5000

lint: $(STAMP) ## ruff lint and format check
	$(VENV)/bin/ruff check src components pipelines tests benchmarks
	$(VENV)/bin/ruff format --check src components pipelines tests benchmarks

clean: ## remove local runs, caches and artifacts (.visionflow); keeps .venv
	rm -rf .visionflow .pytest_cache

.PHONY: help setup test pipeline-run compile bench mlflow-ui lint clean
