"""Attention: seqkernels.flash_attention against torch SDPA and the reference.

Groups are "attention-{device}-{fwd|fwdbwd}-L{L}-{causal|full}", so --benchmark-compare
lines up the same shape across runs, and within a group the implementations compare.
"""

import pytest

from benchlib import run_case

IMPLS = ["seqkernels", "sdpa", "reference"]


def _run(benchmark, device, impl, L, D, causal, backward, rounds):
    if impl == "reference" and L > 2048:
        pytest.skip("the reference's L x L matrices are too large to be worth timing")
    group = f"attention-{device}-{'fwdbwd' if backward else 'fwd'}-L{L}-D{D}-{'causal' if causal else 'full'}"
    run_case(benchmark, f"attention.{impl}", dict(B=1, H=8, L=L, D=D, causal=causal, backward=backward), device,
             group, rounds)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwdbwd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("L", [1024, 4096])
def test_attention_cpu(benchmark, impl, backward, causal, L):
    _run(benchmark, "cpu", impl, L, 64, causal, backward, rounds=5)


GPU_IMPLS = ["seqkernels", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "reference"]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwdbwd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("L", [512, 2048, 8192, 16384])
@pytest.mark.parametrize("D", [64, 128])
def test_attention_gpu(benchmark, impl, backward, causal, L, D):
    """bfloat16, B * L = 16k tokens (issue 4's shapes), against each of torch's SDPA backends."""
    if impl == "reference" and L > 8192:
        pytest.skip("the reference's L x L matrices are too large to be worth timing")
    group = f"attention-cuda-{'fwdbwd' if backward else 'fwd'}-L{L}-D{D}-{'causal' if causal else 'full'}"
    p = dict(B=max(1, 16384 // L), H=2048 // D, L=L, D=D, causal=causal, backward=backward, dtype="bfloat16")
    try:
        run_case(benchmark, f"attention.{impl}", p, "cuda", group, rounds=20)
    except RuntimeError as e:  # a torch backend that does not take these inputs
        pytest.skip(f"{impl}: {str(e)[:120]}")
