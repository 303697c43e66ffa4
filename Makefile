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

# Test wheelhouse for the bundle tests (tests/bundler, tests/e2e): downloaded here, at `make venv`
# time while the network is allowed, so that `unshare -n make test` builds and installs bundles
# offline. Git-ignored; see tests/bundler/fill_wheelhouse.py for what it holds.
WHEELHOUSE := .cache/wheelhouse
WHEELHOUSE_STAMP := $(WHEELHOUSE)/.downloaded

# This checkout's own packages, byte-compiled before the processes that import them start (a fresh clone has no
# __pycache__, and with PYTHONDONTWRITEBYTECODE set, as it is on this project's machines, only the `python -I`
# processes would write one): each `airlock` command or job would compile what it imports (~0.15 CPU-s for a
# vault command). Files whose byte-code is current are skipped; an edit makes a file's byte-code stale, which
# Python detects and ignores.
COMPILE_SOURCES = $(BIN)/python -I -m compileall -q -j 0 appliance bundler tui tests

.PHONY: venv demo demo-soak test lint unit bench models clean gpu-bundle

venv: $(STAMP) $(WHEELHOUSE_STAMP)

$(WHEELHOUSE_STAMP): $(STAMP) tests/bundler/fill_wheelhouse.py
	mkdir -p $(WHEELHOUSE)
	$(BIN)/python tests/bundler/fill_wheelhouse.py $(WHEELHOUSE)
	touch $@

# The wheelhouse downloads (network-bound) while pip installs the venv (CPU-bound), and the installed files are
# byte-compiled once at the end on every core (pip compiles file by file on one); on a fresh clone of this
# project's 2-core machine the venv took 111 s with the steps in turn, 89 s with the download beside them,
# 68 s with the compile on both cores as well.
# The byte-code matters here: the environment sets PYTHONDONTWRITEBYTECODE, so nothing would cache it later.
# fill_wheelhouse.py needs only the standard library and bundler/ (PYTHONPATH). The compile is install.sh's
# (appliance/bytecode.py, ADR 0021): purelib and platlib, on every core; like pip, it leaves without a pyc the
# few files that are not Python 3.11.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	mkdir -p $(WHEELHOUSE)
	PYTHONPATH=$(CURDIR) $(BIN)/python tests/bundler/fill_wheelhouse.py $(WHEELHOUSE) & filling=$$!; \
	$(BIN)/python -m pip install --quiet --no-compile $(TORCH) \
	&& $(BIN)/python -m pip install --quiet --no-compile -e '.[appliance,dev]' \
	&& $(BIN)/python -I -m appliance.bytecode; \
	installed=$$?; wait $$filling; filled=$$?; \
	test $$filled -eq 0 || echo "error: filling the test wheelhouse $(WHEELHOUSE) failed (see above)" >&2; \
	test $$installed -eq 0 && test $$filled -eq 0
	touch $@ $(WHEELHOUSE_STAMP)

# The whole story (README): builds a signed bundle from the wheelhouse, installs it offline, then
# runs every stage with the installed appliance. `$(BIN)/airlock demo --keep` keeps its folder.
demo: $(STAMP) $(WHEELHOUSE_STAMP)
	$(COMPILE_SOURCES)
	$(BIN)/airlock demo

# `make demo` RUNS times in a row (default 10), each on a fresh folder: prints each run's time, the
# failing stage of a failed run, and `N passed, M failed`; exits 1 if any run failed.
demo-soak: RUNS ?= 10
demo-soak: $(STAMP) $(WHEELHOUSE_STAMP)
	$(COMPILE_SOURCES)
	$(BIN)/python tests/e2e/demo_soak.py --runs $(RUNS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# pytest-randomly (a dev dependency) shuffles the order on every run and prints the seed, so that a
# test that leans on another test's leftovers fails at once rather than one day in CI. pytest-xdist
# runs it on WORKERS processes (default: one more than the cores; many tests wait on subprocesses, servers and
# the disk, and two workers left about 15% of two cores idle: on this project's 2-core machine, with the same
# background load, three workers took 839 s where two took 995 s, four 1005 s); tests that share a session
# fixture stay on one worker and the longest units go first (tests/conftest.py). `WORKERS=0` runs it in one
# process.
WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))
unit: venv
	$(COMPILE_SOURCES)
	$(BIN)/pytest $(if $(filter 0,$(WORKERS)),,-n $(WORKERS) --dist loadgroup --no-loadscope-reorder)

test: lint unit

bench: venv
	@for bench in tests/bench/bench_*.py; do echo "== $$bench"; $(BIN)/python $$bench || exit 1; done

# Regenerate the tiny demo models (deterministic; tests/test_tiny_models.py checks the hashes).
models: venv
	$(BIN)/python models/build_tiny_models.py

# The CUDA 12 bundle (bundler/examples/cuda12.toml), for real and not part of `make test`: downloads
# ~4.3 GB of wheels from the public index into .cache/gpu/wheels, builds (split at 512 MiB), verifies,
# installs it here as root under `unshare -n` into a temporary prefix and checks `airlock doctor`
# (GPU stack present, no driver: a warning). Prints the IT guide's sizing numbers.
gpu-bundle: $(STAMP)
	$(BIN)/python tests/bundler/gpu_bundle.py

clean:
	rm -rf $(VENV) $(WHEELHOUSE) .pytest_cache .ruff_cache .import_linter_cache
