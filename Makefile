# make test       create .venv if needed, install the pinned development set, build, run the CPU tests,
#                 then the op tests once more under every other CPU capability this machine runs
# make wheel-check  build a wheel (pip wheel .), install it into a fresh venv, smoke-test it with
#                 the avx2 kernels forced
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

.PHONY: test test-cpu-paths bench venv build gpu-check wheel-check clean

test: $(BUILD_STAMP)
	$(VPY) -m pytest tests -q
	$(MAKE) --no-print-directory test-cpu-paths

# The CPU kernels are built once per ISA and one is loaded per process (python/seqkernels/_cpu.py):
# the full suite above ran the best one; the attention, decode and recurrent op tests run again under
# each other capability the CPU supports (about a minute each on 2 cores).
test-cpu-paths: $(BUILD_STAMP)
	@for cap in $$($(VPY) -c "from seqkernels import _C, _cpu; print(' '.join(c for c in _cpu.supported(dict(_C.cpu_features())) if c in _cpu.built() and c != _cpu.capability))"); do \
		echo "== tests/ops with SEQKERNELS_CPU_CAPABILITY=$$cap"; \
		SEQKERNELS_CPU_CAPABILITY=$$cap $(VPY) -m pytest tests/ops -q -p no:cacheprovider || exit 1; \
	done

# About 27 minutes on the 2-core CPU machine (speed sweep of every op family, 3.5 min; decode, 3 min,
# its issue shapes and bf16-vs-float32 runs, 0.5 min;
# a small Llama in transformers, 15 min; then memory).
bench: $(BUILD_STAMP)
	$(VPY) -m seqkernels.bench speed --device cpu --out bench/results
	$(VPY) -m seqkernels.bench speed --device cpu --ops decode --out bench/results
	$(VPY) -m seqkernels.profiling.decode --out bench/results
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

# A wheel as a user would build it (pip wheel ., build isolation off: the build needs the torch it
# runs with), installed with no dependencies into a fresh venv that sees .venv's torch through a
# .pth file, then imported from outside the source tree with the baseline kernels forced.
WHEEL_DIR := build/wheel
wheel-check: $(DEPS_STAMP)
	rm -rf $(WHEEL_DIR) && mkdir -p $(WHEEL_DIR)
	MAX_JOBS=$(JOBS) $(VPY) -m pip wheel -q --no-build-isolation --no-deps -w $(WHEEL_DIR) .
	$(PYTHON) -m venv $(WHEEL_DIR)/venv
	$(VPY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > $$($(WHEEL_DIR)/venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/dev-torch.pth
	$(WHEEL_DIR)/venv/bin/python -m pip install -q --no-deps --no-index $(WHEEL_DIR)/seqkernels-*.whl
	cd $(WHEEL_DIR) && SEQKERNELS_CPU_CAPABILITY=avx2 venv/bin/python $(CURDIR)/tests/wheel_smoke.py > smoke.log
	@cat $(WHEEL_DIR)/smoke.log
	@grep -q "^capability avx2$$" $(WHEEL_DIR)/smoke.log && grep -q "^modules \['_cpu_avx2'\]$$" $(WHEEL_DIR)/smoke.log \
		&& grep -q "^imported from $(CURDIR)/$(WHEEL_DIR)/venv/" $(WHEEL_DIR)/smoke.log && echo "wheel-check: passed"

clean:
	rm -rf build dist *.egg-info python/seqkernels/_C*.so python/seqkernels/_cpu_*.so
