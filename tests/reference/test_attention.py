"""The attention references against torch in float64: outputs and gradients to 1e-10."""

import math

import pytest
import torch
import torch.nn.functional as F

from seqkernels import reference as ref
from tests.helpers import assert_all_close, grads_of

D = torch.float64


def qkv(B, H, Hk, Lq, Lk, E, Ev=None):
    Ev = Ev or E
    return (torch.randn(B, H, Lq, E, dtype=D, requires_grad=True),
            torch.randn(B, Hk, Lk, E, dtype=D, requires_grad=True),
            torch.randn(B, Hk, Lk, Ev, dtype=D, requires_grad=True))


def check_against_torch(q, k, v, **kw):
    exp = F.scaled_dot_product_attention(q, k, v, **kw)
    act = ref.scaled_dot_product_attention(q, k, v, **kw)
    assert_all_close([act], [exp])
    assert_all_close(grads_of([act], [q, k, v]), grads_of([exp], [q, k, v]))


@pytest.mark.parametrize("Lq,Lk", [(1, 1), (7, 7), (5, 13), (13, 5)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_plain_and_causal(Lq, Lk, is_causal):
    check_against_torch(*qkv(2, 3, 3, Lq, Lk, 8, 5), is_causal=is_causal)


def test_sdpa_scale_and_gqa():
    check_against_torch(*qkv(2, 6, 2, 9, 11, 16), scale=0.3, enable_gqa=True)
    check_against_torch(*qkv(1, 4, 1, 3, 7, 8), is_causal=True, enable_gqa=True)


@pytest.mark.parametrize("mask_shape", [(9, 11), (1, 1, 9, 11), (2, 1, 1, 11), (2, 3, 9, 11), (3, 1, 11)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_masks_broadcast(mask_shape, kind):
    q, k, v = qkv(2, 3, 3, 9, 11, 8)
    if kind == "bool":
        mask = torch.rand(mask_shape) > 0.3
        mask[..., 0] = True  # every row keeps a key: torch's fused paths disagree on empty rows
    else:
        mask = torch.randn(mask_shape, dtype=D)
    check_against_torch(q, k, v, attn_mask=mask)


def test_sdpa_rank3_inputs():
    q, k, v = (torch.randn(4, 6, 8, dtype=D, requires_grad=True) for _ in range(3))
    check_against_torch(q, k, v, is_causal=True)


def test_sdpa_fully_masked_row_gives_zero_output_and_gradient():
    q, k, v = qkv(1, 2, 2, 4, 5, 8)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[2] = False
    out = ref.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert not torch.isnan(out).any()
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    gq, = torch.autograd.grad(out.sum(), [q])
    assert not torch.isnan(gq).any() and torch.equal(gq[:, :, 2], torch.zeros_like(gq[:, :, 2]))
    # the other rows are torch's
    exp = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    keep = [0, 1, 3]
    torch.testing.assert_close(out[:, :, keep], exp[:, :, keep], rtol=1e-10, atol=1e-10)


def test_sdpa_causal_with_mask_is_an_error():
    q, k, v = qkv(1, 1, 1, 2, 2, 4)
    with pytest.raises(ValueError, match="attn_mask and is_causal"):
        ref.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(2, 2, dtype=torch.bool), is_causal=True)


def test_sdpa_dropout_with_explicit_mask_and_probs():
    q, k, v = qkv(1, 2, 2, 5, 6, 4)
    keep = torch.rand(1, 2, 5, 6) > 0.25
    out, probs = ref.scaled_dot_product_attention(q, k, v, dropout_p=0.25, dropout_mask=keep, return_probs=True)
    p0 = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
    torch.testing.assert_close(probs, p0 * keep / 0.75, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, probs @ v, rtol=1e-12, atol=1e-12)


def test_sdpa_dropout_keeps_expected_fraction():
    q, k, v = qkv(2, 4, 4, 64, 64, 8)
    _, probs = ref.scaled_dot_product_attention(q, k, v, dropout_p=0.3, return_probs=True)
    frac = (probs != 0).double().mean().item()
    # 32768 Bernoulli(0.7) draws: 5 sigma is about 0.013
    assert abs(frac - 0.7) < 0.013


@pytest.mark.parametrize("Lq,Lk", [(1, 9), (4, 9), (9, 9), (9, 4)])
def test_causal_mask_alignments(Lq, Lk):
    tl = ref.causal_mask(Lq, Lk)
    br = ref.causal_mask(Lq, Lk, bottom_right=True)
    for i in range(Lq):
        for j in range(Lk):
            assert tl[i, j] == (j <= i)
            assert br[i, j] == (j <= i + Lk - Lq)
    if Lq == Lk:
        assert torch.equal(tl, br)
    assert br[-1].all()  # the last query sees every key


@pytest.mark.parametrize("causal", [False, True])
def test_flash_reference_matches_sdpa_and_lse(causal):
    q, k, v = qkv(2, 4, 2, 5, 9, 8)
    out, lse = ref.flash_attention(q, k, v, causal=causal, scale=0.5)
    mask = ref.causal_mask(5, 9, bottom_right=True) if causal else None
    exp = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5, enable_gqa=True)
    torch.testing.assert_close(out, exp, rtol=1e-10, atol=1e-10)
    s = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) * 0.5
    if causal:
        s = s.masked_fill(~mask, -math.inf)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-12, atol=1e-12)


def test_flash_reference_row_without_keys():
    """Bottom-right causal with Lq > Lk: the first Lq - Lk rows see no key."""
    q, k, v = qkv(1, 1, 1, 6, 3, 4)
    out, lse = ref.flash_attention(q, k, v, causal=True)
    assert torch.equal(out[0, 0, :3], torch.zeros(3, 4, dtype=D))
    assert torch.isneginf(lse[0, 0, :3]).all() and torch.isfinite(lse[0, 0, 3:]).all()
