"""Decoding: one step of seqkernels.flash_attention_with_kvcache against torch SDPA over the
live part of the same cache and against seqkernels' general kernel (the decode issue's grid).

Groups are "decode-{device}-B{B}-Lk{Lk}-{dtype}"; within a group the implementations compare.
"""

import pytest
import torch

from seqkernels.profiling.decode import decode_case


def _run(benchmark, device, impl, B, Lk, dtype, rounds):
    fns, _ = decode_case(dict(B=B, H=32, Hk=8, D=128, Lk=Lk, dtype=dtype), device)
    if impl not in fns:
        pytest.skip(f"no {impl} column on {device}")
    fn = fns[impl]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def call():
        fn()
        sync()

    benchmark.group = f"decode-{device}-B{B}-Lk{Lk}-{dtype}"
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=2)


@pytest.mark.parametrize("impl", ["seqkernels", "torch", "general"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("Lk", [512, 4096, 32768])
@pytest.mark.parametrize("B", [1, 8])
def test_decode_cpu(benchmark, impl, dtype, Lk, B):
    _run(benchmark, "cpu", impl, B, Lk, dtype, rounds=5)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["seqkernels", "torch"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("Lk", [512, 4096, 32768])
@pytest.mark.parametrize("B", [1, 8])
def test_decode_gpu(benchmark, impl, dtype, Lk, B):
    _run(benchmark, "cuda", impl, B, Lk, dtype, rounds=20)
