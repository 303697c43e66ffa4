# Two commands on a fresh machine (Python 3.11, no GPU, no hub access):
#   make demo   create .venv and run `airlock demo`
#   make test   create .venv and run the linters and the test suite
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch first and pinned: the CPU wheel lies on this machine's disk; letting another package
# pull "torch" would fetch a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: venv demo test lint unit bench models clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[appliance,dev]'
	touch $@

demo: venv
	$(BIN)/airlock demo

lint: venv
	$(BIN)/ruff check .
	$(BIN)/lint-imports

unit: venv
	$(BIN)/pytest

test: lint unit

bench: venv
	@for bench in tests/bench/bench_*.py; do echo "== $$bench"; $(BIN)/python $$bench || exit 1; done

# Regenerate the tiny demo models (deterministic; tests/test_tiny_models.py checks the hashes).
models: venv
	$(BIN)/python models/build_tiny_models.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .import_linter_cache
