"""Attention's extra features on the CPU: ``python -m seqkernels.profiling.features``.

- Sliding window: a causal window of 512 keys at L = 16k and 32k, ``window=(511, 0)``
  against our own full causal attention and against torch's SDPA given the same window as
  a boolean mask (B=1, H=8, D=64), forward under no_grad and forward+backward.
- Varlen: 8 random lengths packed (``flash_attention_varlen``, causal) against the same
  sequences padded to the longest, through our kernel with ``key_lengths`` and through torch's
  SDPA with the padding and causal mask as a boolean mask (H=8, D=64); forward and
  forward+backward; the padded inputs are built outside the timed region.
- softcap and ALiBi: causal L=2048 (B=1, H=8, D=64) with ``softcap=30`` and with ALiBi
  slopes against plain causal attention.

float32, timed in turns (median after warm-up), with the matmul roof measured in the same
run. Writes ``bench/results/features_cpu.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from .timing import attention_flops, matmul_roof, measure_times_interleaved


def window_mask(L: int, w: int) -> torch.Tensor:
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    return (j <= i) & (j > i - w)


def _runner(tensors, go, backward: bool):
    """fn -> a call that runs fn() under no_grad, or fn().backward(go) with fresh grads."""
    def wrap(f):
        def call():
            if backward:
                for t in tensors:
                    t.grad = None
                f().backward(go)
            else:
                with torch.no_grad():
                    f()
        return call
    return wrap


def _finish(row: dict, times: dict, flops: float, roof: float) -> dict:
    for n, t in times.items():
        row[f"{n}_ms"] = t.median_ms
    row["seqkernels_gflops"] = flops / (row[f"{row['ours']}_ms"] / 1e3) / 1e9
    row["share_of_matmul_roof"] = row["seqkernels_gflops"] * 1e9 / roof
    return row


def window_case(L: int, w: int, backward: bool, torch_too: bool, roof: float) -> dict:
    import seqkernels

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, L, 64, generator=g).requires_grad_(backward) for _ in range(3))
    go = torch.randn(1, 8, L, 64, generator=g)
    mask = window_mask(L, w) if torch_too else None
    run = _runner((q, k, v), go, backward)
    fns = {"window": run(lambda: seqkernels.flash_attention(q, k, v, causal=True, window=(w - 1, 0))),
           "full_causal": run(lambda: seqkernels.flash_attention(q, k, v, causal=True))}
    if torch_too:
        fns["torch_sdpa_mask"] = run(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    times = measure_times_interleaved(fns, warmup=1, repeat=3)
    row = dict(case="window", L=L, window=w, mode="fwd+bwd" if backward else "fwd", B=1, H=8, D=64, dtype="float32",
               ours="window")
    # the work the window leaves: L * w scores (less the first w rows' triangle)
    _finish(row, times, attention_flops(1, 8, L, w, 64, backward=backward) * (1 - (w - 1) / (2 * L)), roof)
    row["speedup_vs_full_causal"] = row["full_causal_ms"] / row["window_ms"]
    if torch_too:
        row["speedup_vs_torch_sdpa_mask"] = row["torch_sdpa_mask_ms"] / row["window_ms"]
    return row


def varlen_case(lengths: list[int], backward: bool, roof: float, H: int = 8, D: int = 64) -> dict:
    import seqkernels

    g = torch.Generator().manual_seed(1)
    total, B, L = sum(lengths), len(lengths), max(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    packed = [torch.randn(total, H, D, generator=g).requires_grad_(backward) for _ in range(3)]
    padded = [torch.zeros(B, H, L, D) for _ in range(3)]
    for b, n in enumerate(lengths):
        for p, t in zip(padded, packed):
            p[b, :, :n] = t.detach()[cu[b]:cu[b + 1]].transpose(0, 1)
    for p in padded:
        p.requires_grad_(backward)
    key_lengths = torch.tensor(lengths)
    keep = (torch.arange(L)[None, :] < key_lengths[:, None])[:, None, None, :] & window_mask(L, L)  # (B, 1, L, L)
    go_packed, go_padded = torch.randn(total, H, D, generator=g), torch.randn(B, H, L, D, generator=g)
    run_packed = _runner(packed, go_packed, backward)
    run_padded = _runner(padded, go_padded, backward)
    fns = {"varlen": run_packed(lambda: seqkernels.flash_attention_varlen(*packed, cu, cu, L, L, causal=True)),
           "padded_key_lengths": run_padded(lambda: seqkernels.flash_attention(*padded, causal=True,
                                                                               key_lengths=key_lengths)),
           "torch_sdpa_padded_mask": run_padded(lambda: F.scaled_dot_product_attention(*padded, attn_mask=keep))}
    times = measure_times_interleaved(fns, warmup=1, repeat=3)
    row = dict(case="varlen", lengths=lengths, total_tokens=total, padded_tokens=B * L, mode="fwd+bwd" if backward
               else "fwd", H=H, D=D, dtype="float32", ours="varlen")
    flops = sum(attention_flops(1, H, n, n, D, causal=True, backward=backward) for n in lengths)
    _finish(row, times, flops, roof)
    row["speedup_vs_padded_key_lengths"] = row["padded_key_lengths_ms"] / row["varlen_ms"]
    row["speedup_vs_torch_sdpa_padded"] = row["torch_sdpa_padded_mask_ms"] / row["varlen_ms"]
    return row


def option_cost_case(backward: bool, roof: float, L: int = 2048) -> dict:
    import seqkernels

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 8, L, 64, generator=g).requires_grad_(backward) for _ in range(3))
    go = torch.randn(1, 8, L, 64, generator=g)
    slopes = 2.0 ** (-torch.arange(1, 9, dtype=torch.float32))  # the ALiBi paper's slopes for 8 heads
    run = _runner((q, k, v), go, backward)
    fns = {"plain": run(lambda: seqkernels.flash_attention(q, k, v, causal=True)),
           "softcap": run(lambda: seqkernels.flash_attention(q, k, v, causal=True, softcap=30.0)),
           "alibi": run(lambda: seqkernels.flash_attention(q, k, v, causal=True, alibi_slopes=slopes))}
    times = measure_times_interleaved(fns, warmup=2, repeat=7)
    row = dict(case="softcap_alibi_cost", L=L, mode="fwd+bwd" if backward else "fwd", B=1, H=8, D=64,
               dtype="float32", ours="plain")
    _finish(row, times, attention_flops(1, 8, L, L, 64, causal=True, backward=backward), roof)
    row["softcap_cost"] = row["softcap_ms"] / row["plain_ms"] - 1
    row["alibi_cost"] = row["alibi_ms"] / row["plain_ms"] - 1
    return row


def main(argv=None) -> int:
    from ..cli import _metadata

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--only", choices=["window", "varlen", "cost"], default=None)
    args = ap.parse_args(argv)
    # the roof is measured before and after the cases (this machine's speed drifts within a
    # run), the larger kept; the shares are recomputed against it at the end
    roof = matmul_roof(torch.float32)
    rows = []
    if args.only in (None, "cost"):
        rows += [option_cost_case(b, roof) for b in (False, True)]
    if args.only in (None, "varlen"):
        lengths = sorted(torch.randint(64, 2048, (8,), generator=torch.Generator().manual_seed(8)).tolist())[::-1]
        rows += [varlen_case(lengths, b, roof) for b in (False, True)]
    if args.only in (None, "window"):
        for L, backward, torch_too in ((16384, False, True), (16384, True, True), (32768, False, True),
                                       (32768, True, False)):
            rows.append(window_case(L, 512, backward, torch_too, roof))
    roof = max(roof, matmul_roof(torch.float32))
    print(f"matmul roof: {roof / 1e9:.0f} GFLOP/s", flush=True)
    for r in rows:
        r["share_of_matmul_roof"] = r["seqkernels_gflops"] * 1e9 / roof
        print(r, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "features_cpu.json"), "w") as f:
        json.dump(dict(meta=_metadata("cpu"), matmul_roof_gflops=roof / 1e9, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
