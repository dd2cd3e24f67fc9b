"""Masked attention and MultiheadAttention: seqkernels against torch with the same mask.

Groups "padded-{device}-{fwd|fwdbwd}-L{L}" hold seqkernels.scaled_dot_product_attention
and torch's with the same boolean (B, 1, 1, L) key-padding mask keeping half the keys,
and seqkernels.flash_attention with the key lengths instead; "mha-{device}-..." holds
nn.MultiheadAttention self-attention with a key_padding_mask (need_weights=False).
"""

import pytest

from benchlib import run_case

PADDED = ["seqkernels", "seqkernels_lengths", "sdpa"]


@pytest.mark.parametrize("impl", PADDED)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwdbwd"])
def test_padded_attention_cpu(benchmark, impl, backward):
    p = dict(B=4, H=8, L=2048, D=64, keep=0.5, backward=backward, dtype="float32")
    run_case(benchmark, f"attention_padded.{impl}", p, "cpu", f"padded-cpu-{'fwdbwd' if backward else 'fwd'}-L2048",
             rounds=3)


@pytest.mark.parametrize("impl", ["seqkernels", "torch"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwdbwd"])
def test_mha_cpu(benchmark, impl, backward):
    p = dict(B=4, L=1024, E=512, heads=8, keep=0.5, backward=backward, dtype="float32")
    run_case(benchmark, f"mha.{impl}", p, "cpu", f"mha-cpu-{'fwdbwd' if backward else 'fwd'}-L1024", rounds=3)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", PADDED)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwdbwd"])
@pytest.mark.parametrize("L", [4096, 8192])
def test_padded_attention_gpu(benchmark, impl, backward, L):
    """Issue 6's GPU target: bfloat16, L=4096, against torch SDPA with the same mask."""
    p = dict(B=4, H=16, L=L, D=128, keep=0.5, backward=backward, dtype="bfloat16")
    run_case(benchmark, f"attention_padded.{impl}", p, "cuda", f"padded-cuda-{'fwdbwd' if backward else 'fwd'}-L{L}",
             rounds=20)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["seqkernels", "torch"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwdbwd"])
def test_mha_gpu(benchmark, impl, backward):
    p = dict(B=8, L=4096, E=1024, heads=16, keep=0.5, backward=backward, dtype="bfloat16")
    run_case(benchmark, f"mha.{impl}", p, "cuda", f"mha-cuda-{'fwdbwd' if backward else 'fwd'}-L4096", rounds=20)
