# Every target that runs code depends on `setup`, so each works as the first command on a
# fresh clone. `setup` is a stamp rule: it reinstalls only when the pins change.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp
ARGS   ?=

.PHONY: setup test lint demo profile compare mlflow-ui docker clean

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

docker:
	docker build -f docker/Dockerfile -t alignmixup-pipeline:latest .

clean:
	rm -rf runs demo_data profile_results compare_results mlflow.db mlruns mlartifacts .pytest_cache
