# dinoalign: `make demo` runs the pipeline on the embedded defaults, `make test` the tests.
# Both create the environment first (uv + the committed uv.lock), on a fresh machine too.
SHELL := /bin/bash
UV ?= $(shell command -v uv 2>/dev/null || echo "$(HOME)/.local/bin/uv")
RUN := $(UV) run --frozen --group test --no-sync
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
# Ray >= 2.47 re-runs `uv run` in every worker when the driver was started by `uv run`,
# which builds a fresh venv per worker from a copy of the repo: workers time out on a
# clean machine. Workers use the driver's interpreter instead.
export RAY_ENABLE_UV_RUN_RUNTIME_ENV := 0
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-cluster env uv mlflow-ui clean chromium

uv:
	@command -v uv >/dev/null 2>&1 || [ -x "$(HOME)/.local/bin/uv" ] || python3 -m pip install --user --quiet uv

.venv/.synced: uv.lock pyproject.toml | uv
	$(UV) sync --frozen --group test --python 3.11
	touch $@

env: .venv/.synced

demo: env
	$(RUN) dvc repro
	$(RUN) dinoalign summary

# Two xdist workers, whole files each (module fixtures start real services once); the
# longest files start first (tests/conftest.py sorts them; --no-loadscope-reorder keeps that
# order: xdist otherwise queues files by their number of tests, and the one-test stack files
# started last). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: env chromium
	$(RUN) python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

# The multi-node Ray tests alone (tests/cluster; make test runs them too; needs root for a
# private network namespace).
test-cluster: env
	DINOALIGN_CLUSTER_FULL=1 $(RUN) python -m pytest -n 0 tests/cluster --durations=10

# Debian's chromium renders the report (and the MLflow UI) in headless tests; installed only
# when missing. Without root or apt the tests that need it skip and say why.
chromium:
	@[ -x /usr/bin/chromium ] || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	  { $$SUDO apt-get install -y chromium || { $$SUDO apt-get update && $$SUDO apt-get install -y chromium; }; } \
	  || echo "chromium: could not install Debian's chromium (needs root or sudo and apt); browser tests will be skipped"; }

mlflow-ui: env
	$(RUN) mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf artifacts mlruns metrics plots report .dvc/cache
