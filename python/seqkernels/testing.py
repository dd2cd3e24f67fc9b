"""Test utilities shared by the test suite and the benchmarks.

- :data:`TOLERANCES` and :func:`assert_close`: tolerances by dtype, for comparing a kernel
  against a float64 reference.
- :func:`seed`: seed every generator a test touches.
- :func:`poison_outputs`: make every kernel output start as NaN, so that an element a
  kernel never writes fails the comparison instead of passing by luck.
"""

from __future__ import annotations

import contextlib
import random

import torch

from . import _C, _cpu

#: (rtol, atol) for comparing a result computed in ``dtype`` against a float64 reference.
#: float64 is tight: kernels and references differ only in summation order.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> tuple[float, float]:
    """(rtol, atol) for ``dtype``, multiplied by ``scale`` (for long reductions)."""
    rtol, atol = TOLERANCES[dtype]
    return rtol * scale, atol * scale


def assert_close(actual, expected, dtype=None, scale: float = 1.0, msg: str = "") -> None:
    """Assert ``actual`` matches ``expected`` within the tolerance of ``dtype``.

    ``dtype`` defaults to ``actual.dtype``; ``expected`` may be in a wider dtype (the
    float64 reference): both are compared in float64. NaN anywhere fails.
    """
    dtype = actual.dtype if dtype is None else dtype
    rtol, atol = tolerance(dtype, scale)
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if torch.isnan(a).any() and not torch.isnan(e).any():
        n = int(torch.isnan(a).sum())
        raise AssertionError(f"{msg}: {n} NaN element(s) in the result (never written?)")
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{msg}\n{m}" if msg else m)


def seed(s: int = 0) -> None:
    """Seed Python's, torch's (CPU and CUDA) generators."""
    random.seed(s)
    torch.manual_seed(s)


@contextlib.contextmanager
def poison_outputs(on: bool = True):
    """Within the block, every output a seqkernels kernel allocates is NaN-filled first."""
    prev = _cpu.set_poison_outputs(on)
    try:
        yield
    finally:
        _cpu.set_poison_outputs(prev)


def poisoned_empty(*sizes, **kwargs) -> torch.Tensor:
    """``torch.empty`` that is NaN-filled while :func:`poison_outputs` is on.

    For Python-side launchers (Triton) that allocate their own outputs.
    """
    t = torch.empty(*sizes, **kwargs)
    if _C.poison_outputs() and t.is_floating_point():
        t.fill_(float("nan"))
    return t


@contextlib.contextmanager
def decode_regime(on: bool):
    """Within the block, flash_attention may (on) or may not (off) take the CPU decode kernel."""
    prev = _cpu.set_decode_regime(on)
    try:
        yield
    finally:
        _cpu.set_decode_regime(prev)
