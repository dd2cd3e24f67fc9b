"""Ahead-of-time compilation of every Triton kernel in every config it can launch with.

Runs ``python -m seqkernels.kernels.aot --json`` in a subprocess (the kernels cannot be
compiled while TRITON_INTERPRET=1, which the rest of the suite sets) and checks for sm_80
and sm_90, for the forward and both backward kernels, every config of
``flash_attention.CONFIGS`` at the largest head dim of its class, float16, causal and not,
and causal with every optional feature on (boolean mask, key lengths, dropout):

- shared memory fits the device (A100: 163 KiB, H100: 227 KiB per block);
- no register spills (stack frame and local memory of the cubin are zero, as read by the
  cuobjdump that the triton package ships);
- on sm_90 the matrix products use wgmma (except the documented NO_WGMMA classes).

A config that fails is to be removed from CONFIGS, not skipped.
"""

import functools
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from seqkernels.kernels import flash_attention as K  # noqa: E402


@functools.lru_cache(maxsize=1)
def _report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "seqkernels.kernels.aot", "--json"], capture_output=True,
                         text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _label(r):
    return (f"{r['kernel']} sm_{r['arch']} head dim {r['head_dim']} config {tuple(r['config'])} causal={r['causal']} "
            f"mask={r['mask'] or '-'}")


def test_every_config_is_compiled():
    rows = _report()
    from seqkernels.kernels.aot import SUFFIXES

    expected = sum(len(cfgs) * len(variants) * kernels
                   for kind, kernels in (("fwd", 1), ("bwd", 2))
                   for suffix, variants in SUFFIXES
                   for arch in (80, 90) for cfgs in K.CONFIGS[kind + suffix][arch].values())
    assert len(rows) == expected
    assert {r["mask"] for r in rows} == {"", "bool", "add", "features", "varlen"}
    assert {r["dtype"] for r in rows} == {"fp16", "fp32"}


def test_shared_memory_fits():
    bad = [f"{_label(r)}: {r['shared']} B" for r in _report() if r["shared"] > r["smem_limit"]]
    assert not bad, bad


def test_no_register_spills():
    bad = [f"{_label(r)}: regs {r['regs']} stack {r['stack']} local {r['local']}" for r in _report()
           if r["stack"] or r["local"]]
    assert not bad, bad


def test_wgmma_on_hopper():
    from seqkernels.kernels.aot import wgmma_required

    bad = [_label(r) for r in _report() if wgmma_required(r) and not r["wgmma"]]
    assert not bad, bad
    assert any(r["arch"] == 90 and r["wgmma"] for r in _report())


def test_every_head_dim_class_has_a_config():
    for kind in ("fwd", "bwd", "fwd_masked", "bwd_masked", "fwd_f32", "bwd_f32"):
        for arch in (80, 90):
            assert set(K.CONFIGS[kind][arch]) == set(K.HEAD_DIM_CLASSES)
            assert all(K.CONFIGS[kind][arch][d] for d in K.HEAD_DIM_CLASSES)
