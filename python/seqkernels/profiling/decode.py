"""The decode benchmark (``seqkernels-bench speed --ops decode``): one generation step with
one query row per head against a KV cache, timed against torch's SDPA over the live part of
the same cache and against seqkernels' general kernel, with the bytes per second each
reaches next to the machine's read bandwidth measured in the same run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .timing import measure_time, measure_times_interleaved

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_bandwidth(nbytes: int, device: str = "cpu", repeat: int = 7) -> float:
    """Bytes per second of a plain read of an nbytes float32 tensor (``torch.sum``)."""
    x = torch.ones(max(nbytes // 4, 1), device=device)
    t = measure_time(lambda: x.sum(), warmup=2, repeat=repeat, device=device)
    return x.numel() * 4 / t.median_s


def decode_grid(quick: bool) -> list[dict]:
    lens = [4096] if quick else [512, 4096, 32768]
    return [dict(B=B, H=32, Hk=8, D=128, Lk=L, dtype=dt)
            for dt in ("float32", "bfloat16") for B in ([1] if quick else [1, 8]) for L in lens]


def decode_case(p: dict, device: str = "cpu"):
    """(functions by column, bytes of K/V one step reads) for one decode shape: the cache
    holds Lk - 1 keys and the step appends one."""
    import seqkernels
    from seqkernels import testing

    dtype = DTYPES[p["dtype"]]
    B, H, Hk, D, L = p["B"], p["H"], p["Hk"], p["D"], p["Lk"]
    g = torch.Generator().manual_seed(0)
    kc = torch.randn(B, Hk, L, D, generator=g).to(device, dtype)
    vc = torch.randn(B, Hk, L, D, generator=g).to(device, dtype)
    q = torch.randn(B, H, 1, D, generator=g).to(device, dtype)
    k, v = (torch.randn(B, Hk, 1, D, generator=g).to(device, dtype) for _ in range(2))
    seqlens = torch.full((B,), L - 1, dtype=torch.int32, device=device)

    def ours():
        with torch.no_grad():
            return seqkernels.flash_attention_with_kvcache(q, kc, vc, k, v, seqlens)

    def sdpa():
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, kc[:, :, :L], vc[:, :, :L], enable_gqa=True)

    def general():
        with torch.no_grad(), testing.decode_regime(False):
            return seqkernels.flash_attention(q, kc, vc)

    fns = {"seqkernels": ours, "torch": sdpa}
    if device == "cpu":
        fns["general"] = general
    return fns, 2 * B * Hk * L * D * kc.element_size()


def run_decode(device: str, quick: bool, repeat: int = 7, progress=None) -> tuple[list[dict], dict]:
    """Rows of step times (ms) and bytes/s, and the read bandwidths measured alongside."""
    # caches up to 16 MiB stay in this machine's 32 MiB L3; larger ones stream from DRAM
    bw = {"read_GBps_16MiB": read_bandwidth(16 << 20, device) / 1e9,
          "read_GBps_1GiB": read_bandwidth(1 << 30, device) / 1e9}
    rows = []
    for p in decode_grid(quick):
        if progress:
            progress.step(f"decode B={p['B']} Lk={p['Lk']} {p['dtype']}")
        fns, nbytes = decode_case(p, device)
        times = measure_times_interleaved(fns, warmup=2, repeat=repeat, device=device)
        row = dict(op="decode", shape=f"B={p['B']} H={p['H']} Hk={p['Hk']} Lk={p['Lk']} D={p['D']}", device=device,
                   **p, kv_bytes=nbytes)
        for col, t in times.items():
            row[f"{col}_ms"] = t.median_ms
            row[f"{col}_GBps"] = nbytes / t.median_s / 1e9
        row["speedup_vs_torch"] = row["torch_ms"] / row["seqkernels_ms"]
        if "general_ms" in row:
            row["speedup_vs_general"] = row["general_ms"] / row["seqkernels_ms"]
        roof = bw["read_GBps_1GiB"] if nbytes > (16 << 20) else bw["read_GBps_16MiB"]
        row["share_of_read_bw"] = row["seqkernels_GBps"] / roof
        rows.append(row)
        del fns
    for r in rows:  # bf16 against our own float32 step at the same shape
        if r["dtype"] != "float32":
            base = [x for x in rows if x["dtype"] == "float32" and x["B"] == r["B"] and x["Lk"] == r["Lk"]]
            if base:
                r["speedup_vs_own_float32"] = base[0]["seqkernels_ms"] / r["seqkernels_ms"]
    return rows, bw


# The decode issue's own shapes (B, H, Hk, Lq, Lk, D, causal), float32; the Lq = 16 one also
# causal (bottom-right: 16 new tokens at the end of the cache, as in speculative decoding).
ISSUE_SHAPES = [(1, 8, 8, 1, 4096, 64, False), (1, 32, 8, 1, 2048, 128, False), (8, 32, 8, 1, 1024, 128, False),
                (1, 32, 32, 1, 512, 128, False), (1, 8, 8, 16, 4096, 64, False), (1, 8, 8, 16, 4096, 64, True)]


def run_issue_shapes(repeat: int = 20) -> list[dict]:
    """flash_attention (decode kernel) against torch SDPA (enable_gqa) and the general kernel
    (decode regime off) on the issue's shapes, float32, no grad, in turns."""
    import seqkernels
    from seqkernels import testing

    rows = []
    for B, H, Hk, Lq, Lk, D, causal in ISSUE_SHAPES:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, H, Lq, D, generator=g)
        k, v = (torch.randn(B, Hk, Lk, D, generator=g) for _ in range(2))
        mask = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq) if causal else None

        def general():
            with testing.decode_regime(False):
                return seqkernels.flash_attention(q, k, v, causal=causal)

        fns = {"seqkernels": lambda: seqkernels.flash_attention(q, k, v, causal=causal),
               "torch": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
               "general": general}
        with torch.no_grad():
            t = measure_times_interleaved(fns, warmup=3, repeat=repeat)
        nbytes = 2 * B * Hk * Lk * D * 4
        rows.append(dict(B=B, H=H, Hk=Hk, Lq=Lq, Lk=Lk, D=D, causal=causal, **{f"{n}_ms": x.median_ms for n, x in t.items()},
                         speedup_vs_torch=t["torch"].median_s / t["seqkernels"].median_s,
                         speedup_vs_general=t["general"].median_s / t["seqkernels"].median_s,
                         kv_GBps=nbytes / t["seqkernels"].median_s / 1e9))
    return rows


def run_bf16_vs_f32(repeat: int = 11) -> list[dict]:
    """One flash_attention_with_kvcache step with a float32 and a bfloat16 cache of the same
    shape (H=32, Hk=8, D=128), timed against each other in turns."""
    rows = []
    for B in (1, 8):
        for L in (512, 4096, 32768):
            fns = {dt: decode_case(dict(B=B, H=32, Hk=8, D=128, Lk=L, dtype=dt))[0]["seqkernels"]
                   for dt in ("float32", "bfloat16")}
            t = measure_times_interleaved(fns, warmup=2, repeat=repeat)
            rows.append(dict(B=B, H=32, Hk=8, D=128, Lk=L, float32_ms=t["float32"].median_ms,
                             bfloat16_ms=t["bfloat16"].median_ms,
                             bf16_speedup=t["float32"].median_s / t["bfloat16"].median_s))
            del fns
    return rows


def main(argv=None) -> None:
    """``python -m seqkernels.profiling.decode [--out DIR] [--suffix S]``: the issue's shapes and
    the bf16 / float32 comparison, into decode_issue_shapes_cpu{S}.json and
    decode_bf16_vs_f32_cpu{S}.json (the CPU capability that ran is in the metadata)."""
    import argparse
    import datetime
    import json
    import os

    from ..cli import machine_description

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--suffix", default="", help="appended to the file names (e.g. _avx2 for a forced capability)")
    args = ap.parse_args(argv)
    machine = f"{machine_description('cpu')}, torch {torch.__version__}"
    import seqkernels
    machine += f", cpu capability {seqkernels.build_info()['cpu_capability']}"
    date = datetime.date.today().isoformat()
    bw = {"read_GBps_16MiB": read_bandwidth(16 << 20) / 1e9, "read_GBps_1GiB": read_bandwidth(1 << 30) / 1e9}
    for name, what, fn in [
        ("decode_issue_shapes_cpu.json", "the decode issue's five shapes: flash_attention (decode kernel) vs torch SDPA "
         "(enable_gqa; with causal, a bottom-right boolean mask) vs the general kernel (decode regime off), float32, no grad, "
         "one process, in turns, median of 20 after 3 warm-ups", run_issue_shapes),
        ("decode_bf16_vs_f32_cpu.json", "one decode step of flash_attention_with_kvcache with a float32 and a bfloat16 "
         "cache of the same shape, timed against each other in turns in one process (median of 11 after 2 warm-ups)",
         run_bf16_vs_f32),
    ]:
        rows = fn()
        name = name.replace(".json", f"{args.suffix}.json")
        with open(os.path.join(args.out, name), "w") as f:
            json.dump({"meta": dict(what=what, machine=machine, date=date, **bw), "rows": rows}, f, indent=1)
        for r in rows:
            print(name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})


if __name__ == "__main__":
    main()
