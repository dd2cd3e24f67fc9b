"""CPU attention throughput against torch: ``python -m seqkernels.profiling.throughput``.

The table of the CPU-throughput issue: B=1, H=8, L in {512, 2048, 8192}, forward (under
no_grad) and forward+backward, D in {64, 128}, float32 and bfloat16, causal or not; ``seqkernels.flash_attention`` against torch's SDPA on the same inputs, and our bf16
against our float32 (timed in turns in one process, median after warm-up). Each row has our
GFLOP/s and its share of a plain 2048^3 matmul's rate in the same dtype, measured in the same
run (before and after the cases, the larger kept), and torch's GFLOP/s and share beside it.
LSTM rows: T=100, B=64, I=H=512 forward under no_grad, ``seqkernels.nn.LSTM`` against
``nn.LSTM`` in each dtype.

The CPU capability that ran is in the metadata (``SEQKERNELS_CPU_CAPABILITY=avx2`` times the
baseline build). Writes ``bench/results/throughput_cpu[_<capability>].json``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from .features import _runner
from .timing import attention_flops, matmul_roof, measure_times_interleaved

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def attention_case(L: int, D: int, causal: bool, backward: bool, dtypes=("float32", "bfloat16"),
                   H: int = 8) -> list[dict]:
    """One shape in each dtype, every implementation timed in turns with the others."""
    import seqkernels

    g = torch.Generator().manual_seed(0)
    base = [torch.randn(1, H, L, D, generator=g) for _ in range(3)]
    go = torch.randn(1, H, L, D, generator=g)
    fns = {}
    for name in dtypes:
        dt = DTYPES[name]
        q, k, v = (t.to(dt).requires_grad_(backward) for t in base)
        run = _runner((q, k, v), go.to(dt), backward)
        fns[f"seqkernels_{name}"] = run(lambda q=q, k=k, v=v: seqkernels.flash_attention(q, k, v, causal=causal))
        fns[f"torch_{name}"] = run(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    repeat = 3 if L >= 4096 or (backward and L >= 2048) else 7
    warmup = 0 if backward and L >= 8192 else 1  # ~10 s a call: the first of three is the warm-up's cost
    times = measure_times_interleaved(fns, warmup=warmup, repeat=repeat)
    flops = attention_flops(1, H, L, L, D, causal=causal, backward=backward)
    rows = []
    for name in dtypes:
        ours, theirs = times[f"seqkernels_{name}"].median_s, times[f"torch_{name}"].median_s
        row = dict(op="attention", L=L, D=D, H=H, dtype=name, causal=causal,
                   pass_="forward+backward" if backward else "forward",
                   seqkernels_ms=ours * 1e3, torch_ms=theirs * 1e3, speedup_vs_torch=theirs / ours,
                   seqkernels_gflops=flops / ours / 1e9, torch_gflops=flops / theirs / 1e9)
        if name != "float32" and "float32" in dtypes:
            row["speedup_vs_our_float32"] = times["seqkernels_float32"].median_s / ours
        rows.append(row)
    return rows


def lstm_case(dtype: str, T: int = 100, B: int = 64, I: int = 512, Hd: int = 512) -> dict:
    import seqkernels

    dt = DTYPES[dtype]
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, Hd).to(dt)
    ours = seqkernels.nn.LSTM(I, Hd).to(dt)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I).to(dt)
    with torch.no_grad():
        times = measure_times_interleaved({"seqkernels": lambda: ours(x), "torch": lambda: ref(x)}, warmup=2, repeat=7)
    flops = 2.0 * T * B * 4 * Hd * (I + Hd)
    o, t = times["seqkernels"].median_s, times["torch"].median_s
    return dict(op="lstm", T=T, B=B, I=I, H=Hd, dtype=dtype, pass_="forward", seqkernels_ms=o * 1e3,
                torch_ms=t * 1e3, speedup_vs_torch=t / o, seqkernels_gflops=flops / o / 1e9,
                torch_gflops=flops / t / 1e9)


def main(argv=None) -> int:
    from .._info import build_info
    from ..cli import _metadata

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--quick", action="store_true", help="L=2048, D=64 only (a smoke run)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args(argv)
    dtypes = tuple(args.dtypes.split(","))
    roofs = {n: matmul_roof(DTYPES[n]) for n in dtypes}
    rows = []
    shapes = [(2048, 64)] if args.quick else [(L, D) for L in (512, 2048, 8192) for D in (64, 128)]
    for L, D in shapes:
        for causal in (False, True):
            for backward in (False, True):
                rows += attention_case(L, D, causal, backward, dtypes)
                print(rows[-1], flush=True)
    if not args.quick:
        rows += [lstm_case(n) for n in dtypes]
    roofs = {n: max(r, matmul_roof(DTYPES[n])) for n, r in roofs.items()}
    for r in rows:
        r["share_of_matmul_roof"] = r["seqkernels_gflops"] * 1e9 / roofs[r["dtype"]]
        r["torch_share_of_matmul_roof"] = r["torch_gflops"] * 1e9 / roofs[r["dtype"]]
    cap = build_info()["cpu_capability"]
    name = "throughput_cpu.json" if cap == "avx512_bf16" else f"throughput_cpu_{cap}.json"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(dict(meta=_metadata("cpu") | {"cpu_capability": cap},
                       matmul_roof_gflops={n: r / 1e9 for n, r in roofs.items()}, rows=rows), f, indent=1)
    print(f"matmul roofs (GFLOP/s): { {n: round(r / 1e9) for n, r in roofs.items()} }; wrote {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
