# Two commands do everything on a fresh machine: `make example` and `make test`.
# Both create (or reuse) $(VENV), install what is missing, then run. A second run installs nothing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The stamp records which project files the environment was installed from; it changes only when they do.
STAMP := $(VENV)/.scaling-installed-$(shell cat pyproject.toml 2>/dev/null | cksum | cut -d' ' -f1)
TORCH_VERSION ?= 2.13.0

.PHONY: install services example test check lint typecheck clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): | $(PY)
	@# Install torch first and only when none is importable: a plain `torch` requirement would pull
	@# a multi-GB CUDA build here, and a GPU user's own torch must never be replaced.
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet -e ".[test]"
	@rm -f $(VENV)/.scaling-installed-*
	@touch $@

install: $(STAMP)

example: $(STAMP)
	$(PY) -m examples.transformer_example.run

# Debian packages the cluster tests drive for real (Slurm, munge, sshd); the tests start and stop their own daemons.
services:
	@.ci/install-services

test: $(STAMP) services
	$(PY) -m pytest -q --durations=25

check: $(STAMP)
	$(PY) -m ruff check src tests examples benchmarks
	$(PY) -m ruff format --check src tests examples benchmarks
	$(PY) -m mypy src

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist src/*.egg-info
