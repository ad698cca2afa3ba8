# lens_assets: one-command set-up, demo, tests, UI and benchmarks.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
export LENS_DATA_ROOT ?= $(CURDIR)/data
SURVEY ?= des

.PHONY: setup demo test dev bench clean

# Re-installs only when pyproject.toml changes; uv makes a warm re-install take seconds.
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --disable-pip-version-check uv
	$(VENV)/bin/uv pip install --python $(PY) --quiet -e '.[dev]'
	@touch $@

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	@mkdir -p $(DAGSTER_HOME)
	@cp dagster.yaml $@

setup: $(VENV)/.installed $(DAGSTER_HOME)/dagster.yaml

demo: setup
	$(PY) -m lens_assets.demo --survey $(SURVEY)

test: setup
	$(PY) -m pytest -q

dev: setup
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .dagster_home data .pytest_cache
