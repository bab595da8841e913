# Every target that runs code depends on `setup`, so each works as the first command on a
# fresh clone. `setup` is a stamp rule: it reinstalls only when the pins change.
VENV   ?= .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp
ARGS   ?=
# pytest-xdist workers for `make test`; each test file stays in one (its fixtures are per file).
TEST_WORKERS ?= 2

.PHONY: help setup test test-unit lint demo profile compare mlflow-ui mlflow-server docker clean wheelhouse \
	gpu-check
.DEFAULT_GOAL := help

# `make mlflow-server`: a tracking server for a lab (docs/slurm.md). Loopback unless told.
MLFLOW_HOST      ?= 127.0.0.1
MLFLOW_PORT      ?= 5000
MLFLOW_BACKEND   ?= sqlite:///mlflow-server/mlflow.db
MLFLOW_ARTIFACTS ?= mlflow-server/artifacts

help: ## list the targets (the default: a bare `make` installs nothing)
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(STAMP) ## install the pinned dependencies into .venv (once; again only when the pins change)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(VPY) || python3 -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade "pip>=24"
	$(VPY) -m pip install -q -r requirements.lock
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

lint: setup ## ruff over the repository, and hadolint over docker/Dockerfile
	$(VENV)/bin/ruff check .
	$(VENV)/bin/hadolint docker/Dockerfile

test: setup lint ## the test suite, no GPU needed, in TEST_WORKERS processes (ARGS= passes pytest options)
	$(VPY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

test-unit: setup ## the in-process tests alone (tests/unit: operators, methods, models, recipes; ~3 min)
	$(VPY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests/unit $(ARGS)

demo: setup ## train baseline, AlignMixup and AlignMixup/AE on the digits (CPU, under 2 minutes)
	$(VPY) -m pipeline demo $(ARGS)

profile: setup ## msec/batch of every method, interleaved (ARGS="--size 224 key=value ...")
	$(VPY) -m pipeline profile $(ARGS)

compare: setup ## table and plots of an MLflow experiment (ARGS="--experiment demo")
	$(VPY) -m pipeline compare $(ARGS)

mlflow-ui: setup ## the MLflow UI (one worker) on http://127.0.0.1:$PORT (PORT=5000, MLFLOW_TRACKING_URI)
	@echo "MLflow UI for $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} on http://127.0.0.1:$${PORT:-5000}"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port $${PORT:-5000} --workers 1 \
		--backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}

mlflow-server: setup ## a tracking server for a lab (MLFLOW_HOST, MLFLOW_PORT, MLFLOW_BACKEND)
	@mkdir -p mlflow-server
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
	$(VENV)/bin/mlflow server --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) \
		--backend-store-uri $(MLFLOW_BACKEND) --artifacts-destination $(MLFLOW_ARTIFACTS)

# GPU machines (docs/gpu.md). `make wheelhouse PY=3.12` (where a package index answers) fills
# WHEELS with wheels of requirements-gpu.txt for that Python; on the GPU machine, offline, with
# its own CUDA PyTorch, `make gpu-check WHEELS=dir` installs what is missing into .gpu-site/ and
# writes a report under REPORT. PART= runs some parts (tests,syncs,align,profile,loader).
PY          ?= $(shell python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
WHEELS      ?= wheelhouse
GPU_PYTHON  ?= python3
REPORT      ?= gpu-reports
PART        ?= all
GPU_TIMEOUT ?= 600
IMAGE       ?= alignmixup-pipeline:latest

wheelhouse: ## download the wheels `gpu-check` installs on an offline GPU machine (PY=3.12)
	python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version $(PY) \
		--implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux_2_28_x86_64 --dest $(WHEELS) -r requirements-gpu.txt
	@echo "wheels for Python $(PY) in $(WHEELS)/"

gpu-check: ## on a CUDA machine: GPU tests, sync count and benchmarks, one report (WHEELS=dir)
	$(GPU_PYTHON) benchmarks/gpu_check.py --wheels "$(WHEELS)" --report $(REPORT) \
		--part $(PART) --timeout $(GPU_TIMEOUT)

docker: ## build the training image with BuildKit (docker/Dockerfile)
	DOCKER_BUILDKIT=1 docker build -f docker/Dockerfile -t $(IMAGE) .

clean: ## remove runs, demo data, results and the local MLflow store
	rm -rf runs demo_data profile_results compare_results mlflow.db mlruns mlartifacts .pytest_cache
