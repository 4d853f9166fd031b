# Two entry points: `make run` (service on embedded defaults) and `make test` (the whole suite).
# Both create or update the virtualenv at .venv, put torch in first, then install the project.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.genserve-installed
TORCH_CPU := torch==2.13.0

.PHONY: install run test lint tiny-models clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# A host with CUDA brings its own torch; elsewhere take the CPU wheel, never the multi-GB CUDA build.
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	  else $(PY) -m pip install -q $(TORCH_CPU); fi; \
	fi
	$(PY) -m pip install -q -e ".[dev,train]"
	@touch $(STAMP)

install: $(STAMP)

run: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/genserve serve

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check genserve safety training tests bench

tiny-models: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/genserve tiny-models

clean:
	rm -rf .genserve
