"""The SDPA drop-in against torch's own function on torch's edge cases: tensor-subclass
masks (item 2), empty inputs (11), exception types and messages (12), calls the kernels do
not take (13)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import seqkernels
from seqkernels.ops import attention as attention_ops

from .helpers import assert_raises_like_torch, assert_same_nan_and_values, torch_math_sdpa

sdpa = seqkernels.scaled_dot_product_attention


def _qkv(q_shape, k_shape, v_shape, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_(grad) for s in (q_shape, k_shape, v_shape)]


@pytest.fixture
def kernel_spy(monkeypatch):
    """Counts the calls that reached the fused kernels."""
    calls = []
    real = attention_ops._fwd

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(attention_ops, "_fwd", spy)
    return calls


# --- item 2: tensor-subclass masks ---------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Lower right causal bias")
@pytest.mark.parametrize("make", [causal_upper_left, causal_lower_right])
@pytest.mark.parametrize("lq,lk", [(5, 7), (7, 5), (6, 6), (1, 9)])
def test_causal_bias_is_the_kernels_causal_flag(make, lq, lk, kernel_spy):
    q, k, v = _qkv((2, 3, lq, 8), (2, 3, lk, 8), (2, 3, lk, 8), grad=True)
    bias = make(lq, lk)
    out = sdpa(q, k, v, attn_mask=bias)
    assert type(out) is torch.Tensor
    assert len(kernel_spy) == 1 and kernel_spy[0][3] is True  # causal flag, no mask read
    assert kernel_spy[0][6] is None
    qt, kt, vt = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=make(lq, lk))
    assert_same_nan_and_values(out, ref, atol=1e-12, what="out")
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    for a, e in zip((q, k, v), (qt, kt, vt)):
        assert_same_nan_and_values(a.grad, e.grad, atol=1e-12, what="grad")


def test_causal_bias_under_compile():
    q, k, v = _qkv((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), dtype=torch.float32)
    bias = causal_lower_right(5, 7)
    f = torch.compile(lambda q, k, v, m: sdpa(q, k, v, attn_mask=m), fullgraph=True)
    torch.testing.assert_close(f(q, k, v, bias), F.scaled_dot_product_attention(q, k, v, attn_mask=bias))


def test_causal_bias_errors_like_torch():
    q, k, v = _qkv((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8))
    assert_raises_like_torch(lambda: sdpa(q, k, v, attn_mask=causal_upper_left(5, 7), is_causal=True),
                             lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=causal_upper_left(5, 7),
                                                                    is_causal=True))
    with pytest.raises(RuntimeError, match="CausalBias is for"):
        sdpa(q, k, v, attn_mask=causal_upper_left(4, 7))
    with pytest.raises(TypeError, match="CausalBias"):
        seqkernels.flash_attention(q, k, v, attn_mask=causal_upper_left(5, 7))


class LoggingTensor(torch.Tensor):
    """A subclass with its own __torch_function__ (which records what reached it)."""

    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_other_subclasses_go_through_their_torch_function():
    q, k, v = _qkv((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8))
    mask = (torch.rand(5, 7) > 0.3).as_subclass(LoggingTensor)
    LoggingTensor.seen.clear()
    out = sdpa(q, k, v, attn_mask=mask)
    assert sdpa in LoggingTensor.seen
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.as_subclass(torch.Tensor))
    assert_same_nan_and_values(out.as_subclass(torch.Tensor), ref, atol=1e-12)
    assert type(out) is type(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))  # torch's own result type


# --- item 11: empty inputs, item 13: calls the kernels do not take ------------------------

SHAPES = {
    "Lq=0": ((2, 3, 0, 8), (2, 3, 7, 8), (2, 3, 7, 8)),
    "Lk=0": ((2, 3, 5, 8), (2, 3, 0, 8), (2, 3, 0, 8)),
    "E=0": ((2, 3, 5, 0), (2, 3, 7, 0), (2, 3, 7, 8)),
    "Ev=0": ((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 0)),
    "B=0": ((0, 3, 5, 8), (0, 3, 7, 8), (0, 3, 7, 8)),
    "rank2": ((5, 8), (7, 8), (7, 8)),
    "rank3": ((3, 5, 8), (3, 7, 8), (3, 7, 8)),
    "kv batch broadcast": ((2, 3, 5, 8), (1, 3, 7, 8), (1, 3, 7, 8)),
    "q batch broadcast": ((1, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8)),
    "kv one head": ((2, 3, 5, 8), (2, 1, 7, 8), (2, 1, 7, 8)),
    "q one head": ((2, 1, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8)),
    "rank5 broadcast": ((2, 2, 3, 5, 8), (1, 2, 3, 7, 8), (2, 1, 3, 7, 8)),
    "head dim 300": ((2, 3, 5, 300), (2, 3, 7, 300), (2, 3, 7, 8)),
    "value dim 257": ((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 257)),
}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", list(SHAPES))
def test_shapes_torch_accepts(name, causal):
    q, k, v = _qkv(*SHAPES[name], grad=True)
    out = sdpa(q, k, v, is_causal=causal)
    qt, kt, vt = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = torch_math_sdpa(qt, kt, vt, is_causal=causal)
    assert_same_nan_and_values(out, ref, atol=1e-12, what=name)
    if ref.numel():
        g = torch.randn_like(ref)
        out.backward(g)
        ref.backward(g)
        for a, e in zip((q, k, v), (qt, kt, vt)):
            assert_same_nan_and_values(a.grad, e.grad, atol=1e-12, what=f"{name} grad")


def test_gqa_with_masks_and_broadcast_batch():
    q, k, v = _qkv((2, 4, 5, 8), (1, 2, 7, 8), (1, 2, 7, 8))
    mask = torch.rand(2, 1, 5, 7) > 0.3
    out = sdpa(q, k, v, attn_mask=mask, enable_gqa=True)
    ref = torch_math_sdpa(q, k, v, attn_mask=mask, enable_gqa=True)
    assert_same_nan_and_values(out, ref, atol=1e-12)


def test_fully_masked_rows_give_zeros_like_torch():
    q, k, v = _qkv((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8))
    mask = torch.rand(2, 3, 5, 7) > 0.5
    mask[0, 1, 2] = False
    fmask = torch.zeros(5, 7, dtype=torch.float64)
    fmask[3] = float("-inf")
    for m in (mask, fmask):
        assert_same_nan_and_values(sdpa(q, k, v, attn_mask=m), torch_math_sdpa(q, k, v, attn_mask=m), atol=1e-12)
        assert_same_nan_and_values(sdpa(q, k, v, attn_mask=m), F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                                   atol=1e-12)


# --- item 12: exception types and messages ---------------------------------------------------

def test_is_causal_with_mask_is_torchs_error_and_message():
    q, k, v = _qkv((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8))
    m = torch.ones(5, 7, dtype=torch.bool)
    theirs = str(pytest.raises(RuntimeError, F.scaled_dot_product_attention, q, k, v, attn_mask=m,
                               is_causal=True).value)
    ours = pytest.raises(RuntimeError, sdpa, q, k, v, attn_mask=m, is_causal=True).value
    assert str(ours) == theirs


BAD = {
    "head dims": ((2, 3, 5, 8), (2, 3, 7, 4), (2, 3, 7, 8), {}),
    "dtypes": ((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), {"k_dtype": torch.float32}),
    "heads without gqa": ((2, 4, 5, 8), (2, 2, 7, 8), (2, 2, 7, 8), {}),
    "heads not a multiple": ((2, 4, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), {"enable_gqa": True}),
    "batch": ((2, 3, 5, 8), (3, 3, 7, 8), (3, 3, 7, 8), {}),
    "mask shape": ((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), {"attn_mask": torch.ones(6, 7, dtype=torch.bool)}),
}


@pytest.mark.parametrize("name", list(BAD))
def test_invalid_inputs_raise_torchs_exception_type(name):
    qs, ks, vs, kw = BAD[name]
    kw = dict(kw)
    q, k, v = _qkv(qs, ks, vs)
    k = k.to(kw.pop("k_dtype", k.dtype))
    assert_raises_like_torch(lambda: sdpa(q, k, v, **kw), lambda: F.scaled_dot_product_attention(q, k, v, **kw))
