"""Shared pytest set-up: markers, seeding, NaN-poisoned kernel outputs, the Triton interpreter.

- ``gpu`` tests skip with a reason where no CUDA device is visible.
- ``interpreter`` tests run Triton kernels on CPU tensors under ``TRITON_INTERPRET=1``;
  without a GPU the variable is set here, before any Triton kernel is defined.
- Every test starts seeded and with kernel outputs NaN-poisoned
  (:func:`seqkernels.testing.poison_outputs`).
"""

import os
import tempfile

# A fresh torch.compile cache per test run: inductor's on-disk cache keys do not cover the
# Python fake kernels of custom ops, so a cache left by an older checkout could replay
# graphs built from its (wrong) fake strides.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _INDUCTOR_CACHE = tempfile.mkdtemp(prefix="seqkernels-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _INDUCTOR_CACHE
else:
    _INDUCTOR_CACHE = None

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from seqkernels import testing  # noqa: E402

HAS_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (run `make gpu-check` on one)")
    skip_interp = pytest.mark.skip(reason="needs Triton (TRITON_INTERPRET=1 on the CPU)")
    try:
        import triton  # noqa: F401

        has_triton = True
    except ImportError:
        has_triton = False
    skip_slow = pytest.mark.skip(reason="long profile: run it with `pytest -m slow`")
    run_slow = "slow" in (config.option.markexpr or "")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and not has_triton:
            item.add_marker(skip_interp)


def pytest_sessionfinish(session, exitstatus):
    if _INDUCTOR_CACHE is not None:
        import shutil

        shutil.rmtree(_INDUCTOR_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seeded_and_poisoned():
    testing.seed(0)
    with testing.poison_outputs():
        yield
