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
