"""Sliding-window attention on the CPU: ``python -m seqkernels.profiling.window``.

A causal window of 512 keys at long L: seqkernels with ``window=(511, 0)`` against its own
full causal attention and against torch's SDPA given the same window as a boolean mask
(B=1, H=8, D=64, float32), forward under no_grad and forward+backward, timed in turns
(median after warm-up). Writes ``bench/results/window_cpu.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from .timing import attention_flops, measure_times_interleaved


def window_mask(L: int, w: int) -> torch.Tensor:
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    return (j <= i) & (j > i - w)


def case(L: int, w: int, backward: bool, torch_too: bool) -> dict:
    import seqkernels

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, L, 64, generator=g).requires_grad_(backward) for _ in range(3))
    go = torch.randn(1, 8, L, 64, generator=g)
    mask = window_mask(L, w) if torch_too else None

    def run(f):
        def call():
            if backward:
                for t in (q, k, v):
                    t.grad = None
                f().backward(go)
            else:
                with torch.no_grad():
                    f()
        return call

    fns = {"window": run(lambda: seqkernels.flash_attention(q, k, v, causal=True, window=(w - 1, 0))),
           "full_causal": run(lambda: seqkernels.flash_attention(q, k, v, causal=True))}
    if torch_too:
        fns["torch_sdpa_mask"] = run(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    times = measure_times_interleaved(fns, warmup=1, repeat=3)
    row = dict(L=L, window=w, mode="fwd+bwd" if backward else "fwd", B=1, H=8, D=64, dtype="float32")
    for n, t in times.items():
        row[f"{n}_ms"] = t.median_ms
    row["speedup_vs_full_causal"] = row["full_causal_ms"] / row["window_ms"]
    if torch_too:
        row["speedup_vs_torch_sdpa_mask"] = row["torch_sdpa_mask_ms"] / row["window_ms"]
    # the work the window leaves: L * w scores (less the first w rows' triangle)
    flops = attention_flops(1, 8, L, w, 64, backward=backward) * (1 - (w - 1) / (2 * L))
    row["window_gflops"] = flops / (row["window_ms"] / 1e3) / 1e9
    return row


def main(argv=None) -> int:
    from ..cli import _metadata

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    rows = []
    for L, backward, torch_too in ((16384, False, True), (16384, True, True), (32768, False, True),
                                   (32768, True, False)):
        rows.append(case(L, 512, backward, torch_too))
        print(rows[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "window_cpu.json"), "w") as f:
        json.dump(dict(meta=_metadata("cpu"), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
