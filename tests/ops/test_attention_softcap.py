"""Logit softcapping (Gemma 2): scores s -> softcap * tanh(s / softcap) before every mask,
in the CPU kernel's forward, backward and decode regime, against the float64 reference
(which applies the same formula to the materialized scores)."""

import pytest
import torch

import seqkernels
from seqkernels import reference as ref
from seqkernels import testing
from seqkernels.errors import ArgumentError

from .test_attention import make
from .test_attention_masks import check_flash

OPS = torch.ops.seqkernels


def _big(q, k, v, s=4.0):
    """Scores well beyond the cap, so that tanh saturates and the cap matters."""
    return (q.detach() * s).requires_grad_(), k, v


@pytest.mark.parametrize("B, H, Hk, Lq, Lk, D", [
    (2, 4, 2, 37, 53, 16),     # one tile
    (1, 2, 2, 300, 701, 32),   # across the forward's 256 x 384 and the backward's 128 x 64 tiles
    (2, 8, 2, 1, 389, 64),     # one row per head: the decode regime
    (1, 4, 1, 3, 130, 8),      # a few rows per K/V head: decode regime, G * Lq = 12
])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_softcap_matches_reference(B, H, Hk, Lq, Lk, D, causal, dtype):
    q, k, v = _big(*make(B, H, Hk, Lq, Lk, D, dtype=dtype))
    check_flash(q, k, v, causal=causal, softcap=1.7)


def option_inputs(kind: str, B: int, H: int, Lq: int, Lk: int) -> dict:
    """flash_attention keywords for one of the other features to combine with: a boolean or
    float mask, key lengths (the second sequence shorter), dropout, softcap, ALiBi, a window."""
    g = torch.Generator().manual_seed(3)
    if kind == "bool":
        return dict(attn_mask=torch.rand(B, 1, Lq, Lk, generator=g) > 0.3)
    if kind == "float":
        return dict(attn_mask=torch.randn(1, H, Lq, Lk, generator=g, dtype=torch.float64))
    if kind == "lengths":
        return dict(key_lengths=torch.tensor([Lk, Lk // 2 - 5]))
    if kind == "alibi":
        return dict(alibi_slopes=torch.rand(B, H, generator=g))
    if kind == "window":
        return dict(window=(Lk // 3, 0))
    return dict(dropout_p=0.3) if kind == "dropout" else dict(softcap=1.2)


@pytest.mark.parametrize("kind", ["bool", "float", "lengths", "dropout"])
def test_softcap_with_masks_and_dropout(kind):
    q, k, v = _big(*make(2, 4, 2, 45, 131, 16, dtype=torch.float64))
    check_flash(q, k, v, causal=True, softcap=0.9, **option_inputs(kind, 2, 4, 45, 131))


def test_softcap_gradcheck():
    q, k, v = _big(*make(1, 2, 1, 5, 7, 4, dtype=torch.float64), s=2.0)
    torch.autograd.gradcheck(lambda q, k, v: seqkernels.flash_attention(q, k, v, causal=True, softcap=1.3),
                             (q, k, v))


def test_softcap_caps_before_the_mask():
    # an additive mask of -1e4 still hides its key after the cap (the cap comes first), and
    # +inf scores become softcap, as in the math
    q, k, v = make(1, 1, 1, 4, 6, 8, dtype=torch.float64)
    q = q.detach().clone()
    q[0, 0, 1, 0] = float("inf")  # scores of row 1: +-inf, capped to +-softcap
    mask = torch.zeros(4, 6, dtype=torch.float64)
    mask[:, 2] = -1e4
    out = seqkernels.flash_attention(q, k.detach(), v.detach(), attn_mask=mask, softcap=2.0)
    e, _ = ref.flash_attention(q, k.detach(), v.detach(), attn_mask=mask, softcap=2.0)
    torch.testing.assert_close(out, e, rtol=1e-12, atol=1e-12)


def test_softcap_nan_propagates():
    q, k, v = (t.detach() for t in make(1, 2, 2, 9, 40, 8, dtype=torch.float32))
    q = q.clone()
    q[0, 1, 4, 0] = float("nan")
    out = seqkernels.flash_attention(q, k, v, softcap=3.0)
    assert out[0, 1, 4].isnan().all() and not out[0, :, :4].isnan().any() and not out[0, 0].isnan().any()


@pytest.mark.parametrize("kwargs", [dict(softcap=-1.0), dict(softcap=float("nan")), dict(softcap=float("inf")),
                                    dict(softcap="2"), dict(window=(-2, 0)), dict(window=(1,)),
                                    dict(window=(1, 2, 3)), dict(window=(1.0, 2)), dict(window="ab"),
                                    dict(window=(True, 0))])
def test_softcap_and_window_bad_values(kwargs):
    q, k, v = make(1, 1, 1, 4, 4, 8)
    with pytest.raises(ArgumentError, match=next(iter(kwargs))):
        seqkernels.flash_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("tail, match", [((-2.0,), "softcap must be a finite number"),
                                         ((0.0, -3, 0), "window sizes must be >= -1")])
def test_softcap_and_window_direct_op_checks_in_cpp(tail, match):
    q, k, v = (t.detach() for t in make(1, 1, 1, 4, 4, 8, dtype=torch.float32))
    with pytest.raises(RuntimeError, match=match):
        OPS.flash_attention_forward(q, k, v, False, True, 0.3, None, None, 0.0, None, *tail)


def test_softcap_opcheck_and_compile():
    q, k, v = (t.detach() for t in make(1, 4, 2, 9, 13, 8, dtype=torch.float32))
    torch.library.opcheck(OPS.flash_attention_forward, (q, k, v, True, True, 0.3, None, None, 0.0, None, 1.5))
    out, lse = OPS.flash_attention_forward(q, k, v, True, True, 0.3, None, None, 0.0, None, 1.5)
    go = torch.randn_like(out)
    torch.library.opcheck(OPS.flash_attention_backward,
                          (go, None, q, k, v, out, lse, True, True, 0.3, None, None, 0.0, None, 1.5))
    f = torch.compile(lambda q, k, v: seqkernels.flash_attention(q, k, v, causal=True, softcap=1.5), fullgraph=True)
    testing.assert_close(f(q, k, v), seqkernels.flash_attention(q, k, v, causal=True, softcap=1.5), torch.float32,
                         1.0, "compiled")


def test_materialized_math_matches_the_kernel():
    """float64 on CUDA (gradcheck) runs the materialized math with softcap; that math is
    device-agnostic, so it is checked here on CPU tensors against the CPU kernel."""
    from seqkernels.ops import attention as attn_ops

    q, k, v = (t.detach() for t in _big(*make(1, 4, 2, 21, 33, 8, dtype=torch.float32)))
    out, lse = attn_ops._materialized(q, k, v, True, True, 0.35, None, None, 0.0, None, 1.5)
    e_out, e_lse = OPS.flash_attention_forward(q, k, v, True, True, 0.35, None, None, 0.0, None, 1.5)
    testing.assert_close(out, e_out, torch.float32, 1.0, "out")
    testing.assert_close(lse, e_lse, torch.float32, 1.0, "lse")


@pytest.mark.parametrize("Lq", [1, 4096])  # the decode regime and the general kernel
def test_float32_cap_is_accurate(Lq):
    """With one key and D = 1 the LSE of a row is its capped score: the float32 tanh of the
    kernels against float64's, over scores from 0 to 40 softcaps (both signs), NaN kept."""
    c = 3.0
    s = torch.cat([torch.linspace(-40 * c, 40 * c, 100_003), torch.logspace(-8, 0, 4001), torch.tensor([0.0])])
    n = s.numel()
    q = torch.zeros(1, 1, n, 1) if Lq != 1 else torch.zeros(n, 1, 1, 1)
    q.view(-1)[:] = s
    q.view(-1)[7] = float("nan")
    k = torch.ones(q.shape[0], 1, 1, 1)
    v = torch.ones(q.shape[0], 1, 1, 1)
    _, lse = seqkernels.flash_attention(q, k, v, scale=1.0, softcap=c, return_lse=True)
    lse = lse.reshape(-1)
    assert lse[7].isnan() and lse.isnan().sum() == 1
    expected = c * torch.tanh(s.double() / c)
    err = (lse.double() - expected).abs()
    err[7] = 0
    assert err.max() <= 2.5e-7 * c, err.max()
    small = s.abs() < 1e-3  # relative accuracy near 0, where 1 - exp(-2x) would cancel
    assert ((lse.double() - expected)[small].abs() <= 1e-6 * expected[small].abs() + 1e-12).all()
