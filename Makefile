# visionflow: `make help` lists the targets. The first target that needs it creates .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CHECKOV_VENV ?= .venv-checkov
BENCH_VENV ?= .venv-bench
ARGS ?=
# The slowest tests, printed at the end of `make test`: where the suite's time goes.
PYTEST_ARGS ?= --durations=25

.DEFAULT_GOAL := help

help: ## show this help
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP) ## create or refresh the virtualenv (.venv) from requirements.lock

test: $(STAMP) $(CHECKOV_VENV)/bin/checkov ## run the test suite (unit + integration with real servers on 127.0.0.1)
	$(PY) -m pytest -m "not e2e" $(PYTEST_ARGS)

pipeline-run: $(STAMP) ## run the whole pipeline here; KFP_HOST=URL submits it to Kubeflow; ARGS='key=value ...'
ifdef KFP_HOST
	$(VENV)/bin/visionflow pipeline submit --host $(KFP_HOST) $(SUBMIT_FLAGS) $(ARGS)
else
	$(VENV)/bin/visionflow pipeline run $(ARGS)
endif

MODEL ?= visionflow-shapes@champion
serve: $(STAMP) ## serve registered versions over HTTP: MODEL=name[@alias|/version] ARGS='serve.port=8080 ...'
	$(VENV)/bin/visionflow serve $(MODEL) $(ARGS)

cluster-sim: $(STAMP) ## (root) the Helm release and a run from the UI with defaults, on a cluster simulated here
	$(PY) -m tests.cluster_sim $(ARGS)

compile: $(STAMP) ## compile the pipeline and components: pipelines/, components/ and the Helm chart's files/
	$(PY) -c 'from pathlib import Path; from visionflow.kfp.compile import compile_all; compile_all(Path.cwd())'

# checkov pins boto3, packaging, networkx... below requirements.lock: it gets its own venv.
$(CHECKOV_VENV)/bin/checkov:
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install -q checkov==3.3.30

bench: $(STAMP) ## benchmarks: side-by-side comparisons, printed as ratios
	$(PY) -m benchmarks $(ARGS)

# locust needs a newer requests than kfp's pin: the load generator gets its own venv.
$(BENCH_VENV)/bin/locust:
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q locust==2.47.0

bench-serve: $(STAMP) $(BENCH_VENV)/bin/locust ## visionflow serve vs mlflow models serve under locust; ARGS='--workdir DIR ...'
	$(PY) -m benchmarks.serve --locust $(BENCH_VENV)/bin/locust $(ARGS)

mlflow-ui: $(STAMP) ## serve the local MLflow store on http://127.0.0.1:5000
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/.visionflow/mlflow.db --host 127.0.0.1 --port 5000

lint: $(STAMP) ## ruff lint and format check; the import contracts (layers, no cycles) in pyproject
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	PYTHONPATH=src $(VENV)/bin/lint-imports
	$(VENV)/bin/hadolint --failure-threshold warning images/*.Dockerfile

# Images: tags are the package's constants (its version), so a compiled pipeline names exactly
# these images. Needs Docker with buildx; PUSH=1 pushes instead of loading.
PUSH ?= 0
PLATFORM ?= linux/amd64
CPU_IMAGE = $(shell $(PY) -c 'import visionflow; print(visionflow.CPU_IMAGE)')
TRAIN_IMAGE = $(shell $(PY) -c 'import visionflow; print(visionflow.TRAIN_IMAGE)')
IMAGE_VERSION = $(shell $(PY) -c 'import visionflow; print(visionflow.__version__)')
BUILDX = docker buildx build --platform $(PLATFORM) $(if $(filter 1,$(PUSH)),--push,--load) \
	--build-arg VISIONFLOW_VERSION=$(IMAGE_VERSION) --build-arg VISIONFLOW_GIT_COMMIT=$(shell git rev-parse HEAD)

images: $(STAMP) ## build the CPU and training images with docker buildx; PUSH=1 pushes them
	$(BUILDX) -f images/cpu.Dockerfile -t $(CPU_IMAGE) .
	$(BUILDX) -f images/train.Dockerfile -t $(TRAIN_IMAGE) .

kind-up: images ## (Docker + network) a kind cluster with KFP, the Training Operator and our chart
	CPU_IMAGE=$(CPU_IMAGE) TRAIN_IMAGE=$(TRAIN_IMAGE) bash scripts/kind-up.sh

e2e: $(STAMP) ## (after kind-up) a tiny pipeline run on the kind cluster with a 2-worker CPU PyTorchJob
	VISIONFLOW_E2E=1 $(PY) -m pytest -m e2e tests/e2e

clean: ## remove local runs, caches and artifacts (.visionflow); keeps .venv
	rm -rf .visionflow .pytest_cache

.PHONY: help setup test pipeline-run serve cluster-sim compile bench bench-serve mlflow-ui lint images kind-up e2e clean
