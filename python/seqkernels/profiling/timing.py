"""Timing: the median of repeated runs after warm-up, with CUDA events on a GPU."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Timing:
    median_s: float
    times_s: list[float] = field(repr=False)

    @property
    def median_ms(self) -> float:
        return self.median_s * 1e3


def measure_time(fn: Callable[[], object], *, warmup: int = 2, repeat: int = 7,
                 device: str = "cpu", min_time_s: float = 0.0) -> Timing:
    """Median wall time of ``fn()`` over ``repeat`` runs after ``warmup`` runs.

    On CUDA each run is timed with CUDA events on the current stream (and synchronized);
    on the CPU with ``time.perf_counter``. ``min_time_s`` adds repeats until the total
    measured time reaches it (for very short functions).
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    cuda = str(device).startswith("cuda")
    while len(times) < repeat or sum(times) < min_time_s:
        times.append(_time_once(fn, cuda))
    return Timing(statistics.median(times), times)


def _time_once(fn: Callable[[], object], cuda: bool) -> float:
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_times_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 2, repeat: int = 7,
                              device: str = "cpu") -> dict[str, Timing]:
    """Like :func:`measure_time` for several functions, timed in turns: repetition i runs
    every function once, in order, before repetition i + 1 starts.

    On a shared machine whose speed drifts over seconds (the 2-core CI machine moves by
    up to ~10% between runs a minute apart), timing one function's repeats and then the
    next's puts that drift into their ratio; in turns, it falls on both alike.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    cuda = str(device).startswith("cuda")
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            times[name].append(_time_once(fn, cuda))
    return {name: Timing(statistics.median(t), t) for name, t in times.items()}


def attention_flops(B: int, H: int, Lq: int, Lk: int, D: int, causal: bool = False,
                    backward: bool = False) -> float:
    """The usual count: 4 B H Lq Lk D forward (two GEMMs), halved for causal; forward +
    backward counts 3.5x the forward (the backward is 2.5x: five GEMMs against two)."""
    f = 4.0 * B * H * Lq * Lk * D * (0.5 if causal else 1.0)
    return f * 3.5 if backward else f


def matmul_roof(dtype: torch.dtype = torch.float32, n: int = 2048) -> float:
    """FLOP/s of one plain (n x n) @ (n x n) matmul in dtype, the compute roof: the faster of
    torch's matmul and, for float32 on a CPU, oneDNN's (``mkldnn_linear`` on oneDNN tensors).
    torch's float32 CPU matmul is MKL's sgemm, which runs AVX2 code on AMD CPUs (about 180
    GFLOP/s on the 2-core Zen 5 machine, against oneDNN's 410 with AVX-512): a roof that low
    would flatter every share measured against it."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    t = measure_time(lambda: a @ b, warmup=2, repeat=5).median_s
    if dtype == torch.float32 and torch.backends.mkldnn.is_available():
        am, bm = a.to_mkldnn(), b.t().contiguous().to_mkldnn()  # linear(a, w) = a @ w^T
        t = min(t, measure_time(lambda: torch._C._nn.mkldnn_linear(am, bm, None), warmup=2, repeat=5).median_s)
    return 2.0 * n ** 3 / t
