# Every target that runs code depends on `setup`, so each works as the first command on a
# fresh clone. `setup` is a stamp rule: it reinstalls only when the pins change.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp
ARGS   ?=

.PHONY: setup test lint demo profile compare mlflow-ui mlflow-server docker clean

# `make mlflow-server`: a tracking server for a lab (docs/slurm.md). Loopback unless told.
MLFLOW_HOST      ?= 127.0.0.1
MLFLOW_PORT      ?= 5000
MLFLOW_BACKEND   ?= sqlite:///mlflow-server/mlflow.db
MLFLOW_ARTIFACTS ?= mlflow-server/artifacts

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	$(PY) -m pytest -q $(ARGS)

demo: setup
	$(PY) -m pipeline demo $(ARGS)

profile: setup
	$(PY) -m pipeline profile $(ARGS)

compare: setup
	$(PY) -m pipeline compare $(ARGS)

mlflow-ui: setup
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port $${PORT:-5000} \
		--backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}

mlflow-server: setup
	@mkdir -p mlflow-server
	$(VENV)/bin/mlflow server --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) \
		--backend-store-uri $(MLFLOW_BACKEND) --artifacts-destination $(MLFLOW_ARTIFACTS)

docker:
	docker build -f docker/Dockerfile -t alignmixup-pipeline:latest .

clean:
	rm -rf runs demo_data profile_results compare_results mlflow.db mlruns mlartifacts .pytest_cache
