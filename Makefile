# make test       create .venv if needed, install the pinned development set, build, run the CPU tests
# make bench      the default CPU benchmark suite: speed and memory tables, JSON/CSV/PNG in bench/results/
# make gpu-check  on a GPU machine with no network: build with the system Python, run `pytest -m gpu`
# make clean      remove build outputs (keeps .venv)

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
JOBS   ?= $(shell nproc 2>/dev/null || echo 2)

SOURCES := setup.py pyproject.toml $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) 2>/dev/null)
DEPS_STAMP  := $(VENV)/.deps-installed
BUILD_STAMP := build/.built

.PHONY: test bench venv build gpu-check clean

test: $(BUILD_STAMP)
	$(VPY) -m pytest tests -q

# About 26 minutes on the 2-core CPU machine (speed sweep of every op family, 3.5 min; decode, 3 min;
# a small Llama in transformers, 15 min; then memory).
bench: $(BUILD_STAMP)
	$(VPY) -m seqkernels.bench speed --device cpu --out bench/results
	$(VPY) -m seqkernels.bench speed --device cpu --ops decode --out bench/results
	$(VPY) -m seqkernels.bench speed --device cpu --ops transformers --out bench/results
	$(VPY) -m seqkernels.bench memory --device cpu --out bench/results

venv: $(DEPS_STAMP)

$(DEPS_STAMP): requirements-dev.txt
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements-dev.txt
	@touch $@

build: $(BUILD_STAMP)

# Editable install without build isolation (it builds against the torch in .venv).
# Rebuilt only when a source file, setup.py or pyproject.toml changes.
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	MAX_JOBS=$(JOBS) $(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	@mkdir -p build && touch $@

# For a machine with an NVIDIA GPU, no network, and a system Python that already has
# torch, Triton and nvcc: build with that Python into build/gpu-site (no venv, no
# downloads), then run the GPU tests and print a summary.
GPU_SITE := build/gpu-site
gpu-check:
	MAX_JOBS=$(JOBS) SEQKERNELS_CUDA=1 $(PYTHON) -m pip install -q --no-build-isolation --no-deps --no-index --upgrade --target $(GPU_SITE) .
	PYTHONPATH=$(CURDIR)/$(GPU_SITE) $(PYTHON) -m seqkernels
	PYTHONPATH=$(CURDIR)/$(GPU_SITE) $(PYTHON) -m pytest tests -m gpu -q -rs -p no:cacheprovider

clean:
	rm -rf build dist *.egg-info python/seqkernels/_C*.so
