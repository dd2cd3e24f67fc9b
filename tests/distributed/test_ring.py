"""Ring flash attention across 2, 3 and 4 gloo processes on 127.0.0.1 against single-process
flash_attention on the whole sequence, in float64 (outputs and q, k, v gradients within
1e-12), and its errors. One spawn per process count runs every case, to keep start-up
(importing torch in each process) to a few seconds per test."""

from __future__ import annotations

import pytest
import torch

import seqkernels
from seqkernels.distributed import ring_flash_attention, shard_sequence, unshard_sequence
from seqkernels.errors import ArgumentError

from seqkernels.distributed.launch import run_ranks

CASES = [  # (causal, layout, method, B, H, Hk, shard length, D, Dv[, scale])
    (False, "contiguous", "ring", 2, 4, 2, 7, 8, 8),
    (True, "contiguous", "ring", 2, 4, 2, 7, 8, 8),
    (False, "zigzag", "ring", 1, 2, 2, 6, 16, 8),
    (True, "zigzag", "ring", 2, 4, 1, 10, 8, 8),
    (True, "zigzag", "ring", 1, 3, 3, 2, 5, 5),  # chunks of one token
    (True, "contiguous", "allgather", 2, 4, 2, 5, 8, 8),
    (False, "contiguous", "allgather", 1, 2, 1, 3, 8, 4),
    (True, "zigzag", "allgather", 2, 4, 2, 6, 8, 8),
    (True, "contiguous", "ring", 1, 2, 2, 130, 16, 16),  # a shard longer than a kernel tile
    (True, "zigzag", "ring", 1, 4, 2, 4, 8, 8, 0.3),
    (False, "zigzag", "allgather", 1, 4, 2, 4, 8, 8, 2.5),
]


def _case_errors(rank, P, case, dtype=torch.float64, seed=0, device="cpu"):
    causal, layout, method, B, H, Hk, Ls, D, Dv = case[:9]
    scale = case[9] if len(case) > 9 else None
    g = torch.Generator().manual_seed(seed)
    L = Ls * P

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device)

    q, k, v, go = randn(B, H, L, D), randn(B, Hk, L, D), randn(B, Hk, L, Dv), randn(B, H, L, Dv)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = seqkernels.flash_attention(*full, causal=causal, scale=scale)
    ref.backward(go)
    shards = [shard_sequence(t, 2, layout).requires_grad_() for t in (q, k, v)]
    out = ring_flash_attention(*shards, causal=causal, scale=scale, layout=layout, method=method)
    out.backward(shard_sequence(go, 2, layout))
    errs = {"out": (out - shard_sequence(ref, 2, layout)).abs().max().item()}
    for name, s, f in zip("qkv", shards, full):
        errs["d" + name] = (s.grad - shard_sequence(f.grad, 2, layout)).abs().max().item()
    # the shards put back together are the sequence
    errs["unshard"] = (unshard_sequence(out.detach(), 2, layout) - ref.detach()).abs().max().item()
    return errs


def _all_cases(rank, P, device="cpu"):
    if device == "cuda":
        device = f"cuda:{rank}"
    return [_case_errors(rank, P, case, device=device) for case in CASES]


@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_ring_matches_single_process_float64(P):
    for rank_errors in run_ranks(_all_cases, P):
        for case, errs in zip(CASES, rank_errors):
            assert max(errs.values()) <= 1e-12, (case, errs)


def _low_precision(rank, P):
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        errs = _case_errors(rank, P, (True, "zigzag", "ring", 1, 4, 2, 8, 16, 16), dtype=dtype)
        out[str(dtype)] = max(errs.values())
    return out


def test_ring_float32_and_bfloat16():
    # float32 against float32 single-process: only summation order differs; bf16: the partial
    # outputs of each block are rounded to bf16 before the merge
    for errs in run_ranks(_low_precision, 2):
        assert errs["torch.float32"] < 1e-5 and errs["torch.bfloat16"] < 5e-2, errs


def _errors(rank, P):
    msgs = {}

    def catch(name, fn):
        try:
            fn()
            msgs[name] = None
        except ArgumentError as e:
            msgs[name] = str(e)

    x = torch.randn(1, 2, 5 + rank, 8, dtype=torch.float64)  # rank 1's shard is longer
    catch("unequal", lambda: ring_flash_attention(x, x[:, :1], x[:, :1]))
    y = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    catch("odd zigzag", lambda: ring_flash_attention(y, y, y, layout="zigzag"))
    catch("layout", lambda: ring_flash_attention(y, y, y, layout="striped"))
    catch("method", lambda: ring_flash_attention(y, y, y, method="tree"))
    catch("q/k lengths", lambda: ring_flash_attention(y, y[:, :, :4], y[:, :, :4]))
    catch("shard", lambda: shard_sequence(torch.zeros(1, 2, 7, 4), 2, layout="zigzag"))
    return msgs


def test_bad_input_errors_on_every_rank():
    for msgs in run_ranks(_errors, 2, timeout=120):
        assert "same (batch, heads, length)" in msgs["unequal"] and "rank 1: (1, 2, 6)" in msgs["unequal"]
        assert "must be even" in msgs["odd zigzag"]
        assert "layout must be one of" in msgs["layout"]
        assert "method must be one of" in msgs["method"]
        assert "same length" in msgs["q/k lengths"]
        assert "not a multiple of 4" in msgs["shard"]


def test_needs_a_process_group():
    x = torch.randn(1, 1, 4, 8)
    with pytest.raises(ArgumentError, match="init_process_group"):
        ring_flash_attention(x, x, x)


def _nccl_cases(rank, P):
    errs = _all_cases(rank, P, "cuda")
    # float32 on the Triton kernels, against the same kernels on one GPU
    errs.append(_case_errors(rank, P, (True, "zigzag", "ring", 1, 4, 2, 64, 64, 64), dtype=torch.float32,
                             device=f"cuda:{rank}"))
    return errs


@pytest.mark.gpu
def test_ring_on_nccl():
    P = torch.cuda.device_count()
    if P < 2:
        pytest.skip(f"needs at least 2 GPUs, found {P}")
    for rank_errors in run_ranks(_nccl_cases, min(P, 4), backend="nccl", timeout=600):
        for errs in rank_errors[:-1]:
            assert max(errs.values()) <= 1e-12, errs
        assert max(rank_errors[-1].values()) < 1e-3, rank_errors[-1]
