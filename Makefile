# lens_assets: one-command set-up, demo, tests, UI and benchmarks.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
export LENS_DATA_ROOT ?= $(CURDIR)/data
SURVEY ?= des
# pytest-xdist processes for `make test`. Whole files go to a worker (module fixtures are built once), in collection
# order; the files that read the session's trained survey go as one unit (lens_assets_tests/conftest.py). Not
# --dist loadgroup: with pytest 9.2, xdist 3.8 ignores xdist_group marks (pytest-xdist#1386).
TEST_WORKERS ?= 2

.PHONY: setup demo test dev bench clean

# Re-installs only when pyproject.toml changes; uv makes a warm re-install take seconds. Bytecode is compiled at
# install: every test and training process imports torch and Lightning, which costs seconds more per process when
# the .pyc files are missing (uv writes none by default, nor does Python under PYTHONDONTWRITEBYTECODE).
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --disable-pip-version-check uv
	$(VENV)/bin/uv pip install --python $(PY) --quiet --compile-bytecode -e '.[dev]'
	@touch $@

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	@mkdir -p $(DAGSTER_HOME)
	@cp dagster.yaml $@

setup: $(VENV)/.installed $(DAGSTER_HOME)/dagster.yaml

demo: setup
	$(PY) -m lens_assets.demo --track all --survey $(SURVEY)

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

dev: setup
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .dagster_home data .pytest_cache
