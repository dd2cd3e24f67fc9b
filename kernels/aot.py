"""Ahead-of-time compile report for the Triton kernels, no GPU needed.

    python -m seqkernels.kernels.aot [--json]

Compiles every kernel (forward, backward dK/dV, backward dQ) in every config of
``flash_attention.CONFIGS`` (in parallel over the CPU cores) for sm_80 and sm_90 with ``triton.compile(...,
target=GPUTarget("cuda", arch, 32))``, at the largest head dim of each class, in float16
with and without the causal mask, and reports per compile:
shared memory, registers, stack frame and local memory (spills; read from the cubin with
the cuobjdump that the triton package ships) and whether the PTX uses wgmma.

Must run with TRITON_INTERPRET unset (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import flash_attention as K

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes per block: A100, H100
KERNELS = {"fwd": K._attn_fwd, "dkdv": K._attn_bwd_dkdv, "dq": K._attn_bwd_dq}
KIND = {"fwd": "fwd", "dkdv": "bwd", "dq": "bwd"}
# (dtype, causal, mask) for the plain configs, and for the *_masked configs, which run
# whenever an optional feature is on: each of those is compiled with a boolean or an
# additive attn_mask, key lengths and dropout on at once; with the score features
# ("features": softcap, a window and ALiBi, with key lengths and dropout); and with packed
# sequences ("varlen": VARLEN with dropout): the heaviest variants of the three families.
# (Every feature at once is not checked: it spills in some configs, slower but exact.)
# bfloat16 compiles to the same tiles.
VARIANTS = [("fp16", True, ""), ("fp16", False, "")]
MASKED_VARIANTS = [("fp16", True, "bool"), ("fp16", True, "add"), ("fp16", True, "features"), ("fp16", True, "varlen")]
# float32 configs serve every launch in float32, features on or off
F32_VARIANTS = [("fp32", True, ""), ("fp32", False, ""), ("fp32", True, "bool"), ("fp32", True, "add"),
                ("fp32", True, "features"), ("fp32", True, "varlen")]
SUFFIXES = (("", VARIANTS), ("_masked", MASKED_VARIANTS), ("_f32", F32_VARIANTS))
_CONSTEXPRS = ("CAUSAL", "BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV", "F32", "MASK_KIND", "HAS_LENGTHS", "DROPOUT",
               "SOFTCAP", "WINDOW", "ALIBI", "VARLEN")
_FP32_POINTERS = {"LSE", "DELTA", "AL"}
_TENSOR_POINTERS = {"Q", "K", "V", "O", "DO", "DK", "DV_", "DQ"}
_I64 = {"seed", "rng_offset", "threshold"}


def cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def signature(fn, dtype: str) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in _CONSTEXPRS:
            sig[name] = "constexpr"
        elif name in _FP32_POINTERS:
            sig[name] = "*fp32"
        elif name in _TENSOR_POINTERS:
            sig[name] = "*" + dtype
        elif name == "M":
            sig[name] = "*i1"
        elif name == "KL":
            sig[name] = "*i64"
        elif name in ("CUQ", "CUK"):
            sig[name] = "*i32"
        elif name in _I64:
            sig[name] = "i64"
        elif name in ("qk_scale", "scale", "drop_scale", "softcap"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(path)
    line = next(line for line in out.splitlines() if "REG:" in line)
    return {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}


def compile_one(kernel: str, arch: int, d: int, cfg: tuple, dtype: str, causal: bool, mask: str = "") -> dict:
    bm, bn, warps, stages = cfg
    fn = KERNELS[kernel]
    sig = signature(fn, dtype)
    if mask == "add":
        sig["M"] = "*" + dtype
    masked = bool(mask)
    src = ASTSource(fn, sig, constexprs=dict(
        CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=d, BLOCK_DV=d, F32=dtype == "fp32",
        MASK_KIND={"": 0, "bool": 1, "add": 2, "features": 0, "varlen": 0}[mask], HAS_LENGTHS=masked and mask != "varlen",
        DROPOUT=masked,
        SOFTCAP=mask == "features", WINDOW=mask == "features", ALIBI=mask == "features", VARLEN=mask == "varlen"))
    c = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))
    res = resources(c.asm["cubin"])
    return dict(kernel=kernel, arch=arch, head_dim=d, config=list(cfg), dtype=dtype, causal=causal, mask=mask,
                kind=KIND[kernel] + ("_f32" if dtype == "fp32" else "_masked" if masked else ""),
                shared=c.metadata.shared, regs=res["REG"], stack=res["STACK"], local=res["LOCAL"],
                wgmma="wgmma" in c.asm["ptx"], smem_limit=SMEM_LIMIT[arch])


def cases(configs=None) -> list[tuple]:
    """(kernel, arch, head dim, config, dtype, causal, mask) for every config in ``configs``."""
    configs = K.CONFIGS if configs is None else configs
    return [(kernel, arch, d, tuple(cfg), dtype, causal, mask)
            for kernel in KERNELS
            for suffix, variants in SUFFIXES
            if KIND[kernel] + suffix in configs
            for arch in (80, 90)
            for d, cfgs in configs[KIND[kernel] + suffix][arch].items()
            for cfg in cfgs
            for dtype, causal, mask in variants]


def report(configs=None, jobs: int = os.cpu_count() or 1) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled ahead of time")
    todo = cases(configs)
    if jobs <= 1:
        return [compile_one(*c) for c in todo]
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.starmap(compile_one, todo)


def wgmma_required(row: dict) -> bool:
    return row["arch"] == 90 and (row["kind"], row["arch"], row["head_dim"]) not in K.NO_WGMMA


def ok(row: dict) -> bool:
    return (row["shared"] <= row["smem_limit"] and row["stack"] == 0 and row["local"] == 0
            and (row["wgmma"] or not wgmma_required(row)))


def decode_report(jobs: int = os.cpu_count() or 1) -> list[dict]:
    """The same report for the flash-decoding kernels (kernels/decode.py)."""
    from . import decode

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled ahead of time")
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.starmap(decode.aot_compile, decode.aot_cases())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--decode" in argv:
        rows = decode_report()
        if "--json" in argv:
            print(json.dumps(rows))
            return 0
        for r in rows:
            print(r)
        return 0 if all(r["shared"] <= r["smem_limit"] and not r["stack"] and not r["local"] for r in rows) else 1
    rows = report()
    if "--json" in argv:
        print(json.dumps(rows))
        return 0
    print(f"{'kernel':<6} {'arch':<6} {'D':>4} {'config (M,N,warps,stages)':<26} {'dtype':<5} {'causal':<6} "
          f"{'mask':<6} {'smem KiB':>8} {'regs':>4} {'stack':>5} {'wgmma':<5} ok")
    for r in rows:
        print(f"{r['kernel']:<6} sm_{r['arch']:<3} {r['head_dim']:>4} {str(tuple(r['config'])):<26} {r['dtype']:<5} "
              f"{str(r['causal']):<6} {(r['mask'] or '-'):<6} {r['shared'] / 1024:>8.1f} {r['regs']:>4} {r['stack']:>5} "
              f"{str(r['wgmma']):<5} {'yes' if ok(r) else 'NO'}")
    return 0 if all(ok(r) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
