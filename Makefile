# Each target sets up its own virtual environment (.venv) first.
# torch==2.13.0 is pinned for CPU machines, where it is the CPU build; on a GPU machine use
# `make test TORCH=torch` (or install torch yourself) to keep its CUDA build.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test bench install

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest tests

bench: install
	$(PY) -m pytest bench --benchmark-only
