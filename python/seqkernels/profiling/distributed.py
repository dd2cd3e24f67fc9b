"""Ring attention measured on one machine: ``python -m seqkernels.profiling.distributed``.

- **time**: forward+backward of :func:`seqkernels.distributed.ring_flash_attention` on P gloo
  ranks with one thread each, against single-process ``flash_attention`` on the whole
  sequence with P threads (the same cores), timed in the parent before and after the
  ranks run. Median after warm-up.
- **memory**: per-rank peak extra bytes of one forward+backward against P at a fixed global
  length, by the CPU profiler's method (:mod:`seqkernels.profiling.memory`: each rank is a
  fresh process with glibc's mmap threshold pinned; peak RSS growth of the second call).

Writes ``bench/results/ring_cpu.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from .memory import _CHILD_ENV
from .timing import measure_time


def _inputs(rank, P, B, H, Hk, L, D, layout, dtype=torch.float32):
    from seqkernels.distributed import shard_sequence

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, L, D, generator=g, dtype=dtype) for h in (H, Hk, Hk))
    go = torch.randn(B, H, L, D, generator=g, dtype=dtype)
    if P == 0:  # the whole sequence, single process
        return [t.requires_grad_() for t in (q, k, v)], go
    return [shard_sequence(t, 2, layout).requires_grad_() for t in (q, k, v)], shard_sequence(go, 2, layout)


def _fwd_bwd(fn, tensors, go):
    def run():
        for t in tensors:
            t.grad = None
        fn(*tensors).backward(go)
    return run


def _rank_time(rank, P, shape, causal, layout, method, repeat):
    import torch.distributed as dist

    from seqkernels.distributed import ring_flash_attention

    tensors, go = _inputs(rank, P, *shape, layout)
    run = _fwd_bwd(lambda q, k, v: ring_flash_attention(q, k, v, causal=causal, layout=layout, method=method),
                   tensors, go)
    run()
    times = []
    for _ in range(repeat):
        dist.barrier()
        t0 = time.perf_counter()
        run()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rank_memory(rank, P, shape, causal, layout, method):
    from seqkernels.distributed import ring_flash_attention

    from .memory import cpu_peak_of

    tensors, go = _inputs(rank, P, *shape, layout)
    return cpu_peak_of(_fwd_bwd(lambda q, k, v: ring_flash_attention(q, k, v, causal=causal, layout=layout,
                                                                     method=method), tensors, go))


def _rank_bandwidth(rank, P, nbytes, repeat=12):
    """Bytes/s of one exchange of nbytes each way with the other rank (P = 2), the link W."""
    import torch.distributed as dist

    x = torch.ones(nbytes // 4)
    y = torch.empty_like(x)
    times = []
    for _ in range(repeat):
        dist.barrier()
        t0 = time.perf_counter()
        for r in dist.batch_isend_irecv([dist.P2POp(dist.isend, x, 1 - rank), dist.P2POp(dist.irecv, y, 1 - rank)]):
            r.wait()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times)


def loopback_bandwidth(nbytes: int = 16 << 20) -> float:
    """GB/s each way between two gloo ranks on 127.0.0.1 (a 16 MiB block: one K/V shard of
    the timed shape)."""
    from seqkernels.distributed.launch import run_ranks

    return min(run_ranks(_rank_bandwidth, 2, nbytes)) / 1e9


def _single_time(shape, causal, threads, repeat):
    import seqkernels

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tensors, go = _inputs(0, 0, *shape, "contiguous")
        run = _fwd_bwd(lambda q, k, v: seqkernels.flash_attention(q, k, v, causal=causal), tensors, go)
        return measure_time(run, warmup=1, repeat=repeat).median_s
    finally:
        torch.set_num_threads(old)


def run(out_dir: str, L: int = 8192, mem_L: int = 16384, repeat: int = 5, quick: bool = False) -> dict:
    from seqkernels.distributed.launch import run_ranks

    shape = (1, 8, 8, L, 64)  # B, H, Hk, L, D
    rows = []
    configs = [(False, "contiguous", "ring"), (True, "zigzag", "ring"), (True, "contiguous", "ring"),
               (False, "contiguous", "allgather"), (True, "zigzag", "allgather")]
    for causal, layout, method in configs[:1] if quick else configs:
        before = _single_time(shape, causal, 2, repeat)
        ranks = run_ranks(_rank_time, 2, shape, causal, layout, method, repeat, timeout=900)
        after = _single_time(shape, causal, 2, repeat)
        single = statistics.median([before, after])
        rows.append(dict(kind="time", P=2, B=1, H=8, Hk=8, L=L, D=64, causal=causal, layout=layout,
                         method=method, ring_ms=max(ranks) * 1e3, single_2threads_ms=single * 1e3,
                         single_before_ms=before * 1e3, single_after_ms=after * 1e3,
                         ratio=max(ranks) / single))
    mshape = (1, 8, 8, mem_L, 64)
    old = {k: os.environ.get(k) for k in _CHILD_ENV}
    os.environ.update(_CHILD_ENV)  # the spawned ranks inherit the pinned malloc thresholds
    try:
        for method in ("ring",) if quick else ("ring", "allgather"):
            for P in (1, 2, 4) if quick or method == "allgather" else (1, 2, 4, 8):
                peaks = run_ranks(_rank_memory, P, mshape, True, "zigzag", method, timeout=900)
                rows.append(dict(kind="memory", P=P, B=1, H=8, Hk=8, L=mem_L, D=64, causal=True, layout="zigzag",
                                 method=method, peak_bytes_per_rank=max(peaks),
                                 shard_inputs_bytes=4 * 1 * 8 * (mem_L // P) * 64 * 4))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    from ..cli import _metadata

    data = dict(meta=dict(_metadata("cpu"), loopback_GBps_16MiB=loopback_bandwidth()), rows=rows)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "ring_cpu.json"), "w") as f:
        json.dump(data, f, indent=1)
    return data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--L", type=int, default=8192)
    ap.add_argument("--mem-L", type=int, default=16384)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    data = run(args.out, args.L, args.mem_L, args.repeat, args.quick)
    for r in data["rows"]:
        print(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
