# One environment in .venv, made on first use; `make run` trains the debug model on the
# embedded shapes world, `make test` runs the whole suite (what CI runs).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: env build run test bench clean

# The package is installed (editable), so the working directory need not be on sys.path; with
# it there, libraries that probe for the PyPI package `kernels` (transformers does) would import
# this repository's kernels/ directory under that name.
export PYTHONSAFEPATH := 1

$(STAMP): requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

env: $(STAMP)

# Builds emu2_engine._C (CMake + pybind11) in place and installs the package in editable mode.
build: $(STAMP)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .

run: build
	$(VENV)/bin/torchrun --standalone --nproc_per_node=1 -m emu2_engine.pretrain

test: build
	$(PY) -m pytest -q tests

# benchmarks/ is not installed: run it from the repository root, on sys.path for this command.
bench: build
	PYTHONSAFEPATH= $(PY) -m benchmarks.run --suite cpu --out benchmarks/results/cpu

clean:
	rm -rf build *.egg-info emu2_engine/_C*.so
