"""Every benchmark case builds and runs at a tiny size, forward and forward+backward."""

import pytest
import torch

from seqkernels.profiling.cases import build_case
from seqkernels.profiling.suites import SPEED_SUITES


@pytest.mark.parametrize("name,params", [
    ("attention_padded.seqkernels", dict(B=2, H=2, L=40, D=8, keep=0.5)),
    ("attention_padded.seqkernels_lengths", dict(B=2, H=2, L=40, D=8, keep=0.5)),
    ("attention_padded.sdpa", dict(B=2, H=2, L=40, D=8, keep=0.5)),
    ("mha.seqkernels", dict(B=2, L=40, E=16, heads=2, keep=0.5)),
    ("mha.torch", dict(B=2, L=40, E=16, heads=2, keep=0.5)),
])
@pytest.mark.parametrize("backward", [False, True])
def test_case_runs(name, params, backward):
    out = build_case(name, dict(params, backward=backward), "cpu")()
    outs = out if isinstance(out, (tuple, list)) else (out,)
    assert all(torch.isfinite(o).all() for o in outs)


def test_padded_cases_agree():
    """The three padded-attention columns compute the same thing."""
    p = dict(B=2, H=2, L=40, D=8, keep=0.5, backward=False)
    torch.manual_seed(0)
    a = build_case("attention_padded.seqkernels", p, "cpu")()
    torch.manual_seed(0)
    b = build_case("attention_padded.sdpa", p, "cpu")()
    torch.manual_seed(0)
    c = build_case("attention_padded.seqkernels_lengths", p, "cpu")()
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(c, b, rtol=2e-5, atol=2e-5)


def test_every_suite_lists_cases():
    for name, suite in SPEED_SUITES.items():
        cases = suite("cpu", True)
        assert cases and all(c.impls and c.flops > 0 for c in cases), name


def test_sdpa_backend_cases():
    """torch SDPA held to one backend: math runs anywhere; a backend that cannot take the
    inputs raises RuntimeError, which the speed sweep records as a missing column."""
    p = dict(B=1, H=2, L=32, D=16, causal=True, backward=False)
    torch.manual_seed(0)
    a = build_case("attention.sdpa_math", p, "cpu")()
    torch.manual_seed(0)
    b = build_case("attention.sdpa", p, "cpu")()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError):
        build_case("attention.sdpa_cudnn", p, "cpu")()


def test_gpu_attention_grid_uses_issue_shapes():
    from seqkernels.profiling.suites import attention_speed_cases

    cases = attention_speed_cases("cuda", quick=False)
    assert {c.params["dtype"] for c in cases} == {"bfloat16"}
    assert all(c.params["B"] * c.params["L"] >= 16384 and "sdpa_cudnn" in c.impls for c in cases)
