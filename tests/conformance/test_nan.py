"""Item 1: NaN in q, k, v, a float mask or the scale reaches every output it touches, as in
torch's math path, forward and backward, on the CPU kernel and the Triton kernels; a row
that no key may see still gives zeros."""

from __future__ import annotations

import pytest
import torch

import seqkernels

from .helpers import assert_same_nan_and_values, torch_math_sdpa

NAN = float("nan")
# Lk = 401 spans two forward kv tiles (384) and several backward ones; Lq = 37 is odd.
B, H, LQ, LK, D = 2, 3, 37, 401, 16


def _inputs(where: str, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=dtype) for n in (LQ, LK, LK))
    mask, scale = None, None
    if where == "q":
        q[1, 2, 11, 5] = NAN
    elif where == "k_first_tile":
        k[0, 1, 17, 0] = NAN  # inside the first key tile
    elif where == "k_last_key":
        k[1, 0, LK - 1, 3] = NAN
    elif where == "v":
        v[0, 2, 200, 7] = NAN
    elif where == "mask":
        mask = torch.zeros(LQ, LK, dtype=dtype)
        mask[30, 390] = NAN  # second key tile; visible to row 30 under the bottom-right causal mask too
    elif where == "scale_nan":
        scale = NAN
    elif where == "scale_inf":
        scale = float("inf")
    elif where == "q_inf":
        q[0, 0, 3, 1] = float("inf")
    return q, k, v, mask, scale


CASES = ["q", "k_first_tile", "k_last_key", "v", "mask", "scale_nan", "scale_inf", "q_inf"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("where", CASES)
def test_sdpa_nan_forward_and_backward_like_torch(where, dtype):
    q, k, v, mask, scale = _inputs(where, dtype)
    ours_in = [t.clone().requires_grad_() for t in (q, k, v)]
    theirs_in = [t.clone().requires_grad_() for t in (q, k, v)]
    out = seqkernels.scaled_dot_product_attention(*ours_in, attn_mask=mask, scale=scale)
    ref = torch_math_sdpa(*theirs_in, attn_mask=mask, scale=scale)
    assert torch.isnan(ref).any()
    assert_same_nan_and_values(out, ref, what="out")
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    for name, a, e in zip("qkv", ours_in, theirs_in):
        assert_same_nan_and_values(a.grad, e.grad, what=f"d{name}")


@pytest.mark.parametrize("where", ["q", "k_first_tile", "mask", "scale_nan"])
def test_flash_attention_nan_reaches_out_and_lse(where):
    q, k, v, mask, scale = _inputs(where)
    out, lse = seqkernels.flash_attention(q, k, v, scale=scale, attn_mask=mask, return_lse=True)
    ref_out, ref_lse = seqkernels.reference.flash_attention(q, k, v, scale=scale, attn_mask=mask)
    assert_same_nan_and_values(out, ref_out, what="out")
    assert_same_nan_and_values(lse, ref_lse, what="lse")


def test_nan_in_padding_keys_is_not_read_and_empty_rows_stay_zero():
    """Keys past key_lengths are never read, so NaN there reaches nothing; a row that sees no
    key (the boolean mask hides row 4) is 0, never NaN. (Inside a tile that is read, a NaN
    value at a position the mask hides meets a zero probability, and 0 * NaN is NaN, as in
    torch's math path.)"""
    q, k, v, _, _ = _inputs("none")
    k[:, :, 300:] = NAN
    v[:, :, 300:] = NAN
    mask = torch.ones(LQ, LK, dtype=torch.bool)
    mask[4] = False
    out = seqkernels.flash_attention(q, k, v, attn_mask=mask, key_lengths=torch.tensor([300, 300]))
    assert not torch.isnan(out).any()
    assert torch.equal(out[:, :, 4], torch.zeros_like(out[:, :, 4]))
    ref = torch_math_sdpa(q, k[..., :300, :], v[..., :300, :], attn_mask=mask[:, :300])
    assert_same_nan_and_values(out, ref, atol=1e-12, what="out")


@pytest.mark.parametrize("where", ["q", "k_first_tile", "mask", "scale_nan"])
def test_causal_and_key_lengths_paths_propagate_nan(where):
    q, k, v, mask, scale = _inputs(where)
    out = seqkernels.flash_attention(q, k, v, causal=True, scale=scale, attn_mask=mask,
                                     key_lengths=torch.tensor([LK, LK]))
    ref, _ = seqkernels.reference.flash_attention(q, k, v, causal=True, scale=scale, attn_mask=mask)
    assert_same_nan_and_values(out, ref, what="out")
