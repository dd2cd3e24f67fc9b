"""Conformance edge cases on the Triton kernels (issue 12): NaN propagation forward and
backward, and torch's CausalBias masks, through the same drop-in code as on the CPU.

Without a GPU they run under Triton's interpreter on CPU tensors (small sizes).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import seqkernels
from seqkernels import reference as ref
from seqkernels.ops import attention as attention_ops

K = pytest.importorskip("seqkernels.kernels.flash_attention")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.interpreter if DEVICE == "cpu" else pytest.mark.gpu
NAN = float("nan")


def _same_nan(a, e, what):
    a, e = a.detach().cpu().double(), e.detach().cpu().double()
    assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{what}: NaN at {int(torch.isnan(a).sum())} places, " \
                                                         f"the reference at {int(torch.isnan(e).sum())}"
    torch.testing.assert_close(a.nan_to_num(), e.nan_to_num(), rtol=1e-3, atol=1e-3, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("where", ["q", "k", "v", "mask", "scale", "none_hidden_row"])
def test_nan_forward_and_backward(where):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for n in (19, 37, 37))
    mask, scale = None, 0.25
    if where == "q":
        q[0, 1, 4, 2] = NAN
    elif where == "k":
        k[0, 0, 33, 1] = NAN  # in the second key block of 32
    elif where == "v":
        v[0, 1, 5, 0] = NAN
    elif where == "mask":
        mask = torch.zeros(1, 1, 19, 37)
        mask[0, 0, 7, 20] = NAN
    elif where == "scale":
        scale = NAN
    else:  # a fully masked row stays 0, not NaN
        mask = torch.zeros(1, 1, 19, 37)
        mask[0, 0, 3] = float("-inf")
    dev = [t.to(DEVICE) for t in (q, k, v)]
    m = None if mask is None else mask.to(DEVICE)
    out, lse = K.forward(*dev, False, True, scale, m, None, 0.0, None)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    out_e, lse_e = ref.flash_attention(qr, kr, vr, scale=scale, attn_mask=None if mask is None else mask.double())
    _same_nan(out, out_e, "out")
    _same_nan(torch.where(torch.isinf(lse), torch.zeros_like(lse), lse),
              torch.where(torch.isinf(lse_e), torch.zeros_like(lse_e), lse_e), "lse")
    go = torch.randn(out.shape, generator=g)
    grads = K.backward(go.to(DEVICE), None, *dev, out, lse, False, True, scale, m, None, 0.0, None)
    out_e.backward(go.double())
    for name, a, e in zip("qkv", grads, (qr, kr, vr)):
        _same_nan(a, e.grad, f"d{name}")
    if where == "none_hidden_row":
        assert torch.equal(out[0, :, 3].cpu(), torch.zeros(2, 16))


@pytest.fixture
def triton_forward(monkeypatch):
    """Route the drop-in's op call to the Triton forward on CPU tensors (the interpreter)."""
    calls = []

    def fwd(q, k, v, causal, bottom_right, scale, attn_mask=None, key_lengths=None, dropout_p=0.0, rng_state=None,
            softcap=0.0, window_left=-1, window_right=-1, alibi_slopes=None):
        calls.append((causal, bottom_right, attn_mask))
        return K.forward(q, k, v, causal, bottom_right, scale, attn_mask, key_lengths, dropout_p, rng_state, softcap,
                         window_left, window_right, alibi_slopes)

    monkeypatch.setattr(attention_ops, "_fwd", fwd)
    return calls


@pytest.mark.filterwarnings("ignore:Lower right causal bias")
@pytest.mark.parametrize("make", [causal_upper_left, causal_lower_right])
@pytest.mark.parametrize("lq,lk", [(5, 37), (37, 5), (19, 19)])
def test_causal_bias_on_triton(make, lq, lk, triton_forward):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g).to(DEVICE) for n in (lq, lk, lk))
    with torch.no_grad():
        out = seqkernels.scaled_dot_product_attention(q, k, v, attn_mask=make(lq, lk))
    assert type(out) is torch.Tensor and len(triton_forward) == 1
    causal, bottom_right, mask = triton_forward[0]
    assert causal and mask is None and bottom_right == (make is causal_lower_right and lq != lk)
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=make(lq, lk))
    _same_nan(out, expected, "out")
