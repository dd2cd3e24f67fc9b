"""Items 3 and 9: second derivatives are an error, never zeros; torch.func transforms and
meta tensors work or say what is unsupported."""

from __future__ import annotations

import pytest
import torch

import seqkernels

from .helpers import torch_math_sdpa


def _qkv(grad=True):
    g = torch.Generator().manual_seed(2)
    return [torch.randn(1, 2, n, 4, generator=g, dtype=torch.float64).requires_grad_(grad) for n in (3, 5, 5)]


def _lstm_inputs():
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    return x


ATTENTION_CALLS = {
    "flash_attention": lambda q, k, v: seqkernels.flash_attention(q, k, v, causal=True),
    "flash_attention lse": lambda q, k, v: seqkernels.flash_attention(q, k, v, return_lse=True)[1],
    "sdpa": lambda q, k, v: seqkernels.scaled_dot_product_attention(q, k, v),
    "sdpa masked": lambda q, k, v: seqkernels.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.tensor([True, False, True, True, True])),
}


@pytest.mark.parametrize("name", list(ATTENTION_CALLS))
def test_attention_double_backward_raises(name):
    q, k, v = _qkv()
    f = ATTENTION_CALLS[name]
    assert torch.autograd.gradcheck(f, (q, k, v))
    with pytest.raises(RuntimeError, match="derivative for seqkernels::flash_attention_backward is not implemented"):
        torch.autograd.gradgradcheck(f, (q, k, v))


def test_second_backward_raises_rather_than_returning_zeros():
    q, k, v = _qkv()
    out = seqkernels.flash_attention(q, k, v)
    (gq,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    assert gq.requires_grad  # the first derivative is right and carries a graph ...
    with pytest.raises(RuntimeError, match="not implemented"):  # ... whose backward raises
        gq.sum().backward()


def test_mha_and_float_mask_with_grad():
    """A float mask that requires grad runs the materialized math, where double backward is
    exact; MHA on the kernels raises."""
    q, k, v = _qkv()
    m = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda q, k, v, m: seqkernels.scaled_dot_product_attention(q, k, v, attn_mask=m), (q, k, v, m))
    mha = seqkernels.nn.MultiheadAttention(4, 2, batch_first=True).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.gradgradcheck(lambda x: mha(x, x, x, need_weights=False)[0], (x,))


RECURRENT = {
    "LSTM": lambda: seqkernels.nn.LSTM(3, 4, num_layers=2, bidirectional=True),
    "LSTMP": lambda: seqkernels.nn.LSTM(3, 4, proj_size=2),
    "RNN": lambda: seqkernels.nn.RNN(3, 4),
    "LSTMCell": lambda: seqkernels.nn.LSTMCell(3, 4),
    "RNNCell": lambda: seqkernels.nn.RNNCell(3, 4),
}


@pytest.mark.parametrize("name", list(RECURRENT))
def test_recurrent_double_backward_raises(name):
    m = RECURRENT[name]().double()
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    if "Cell" in name:
        x = x[0].detach().requires_grad_()

    def f(x):
        out = m(x)
        return out[0] if isinstance(out, tuple) else out

    assert torch.autograd.gradcheck(f, (x,))
    with pytest.raises(RuntimeError, match=r"derivative for seqkernels::(lstm|rnn)_layer_backward is not implemented"):
        torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.parametrize("transform", ["grad", "jacrev", "vmap"])
def test_torch_func_attention_runs_the_same_math(transform):
    q, k, v = _qkv(grad=False)
    f_ours = lambda q: seqkernels.flash_attention(q, k, v, causal=True).sum()  # noqa: E731
    f_ref = lambda q: seqkernels.reference.flash_attention(q, k, v, causal=True)[0].sum()  # noqa: E731
    if transform == "vmap":
        qs = torch.stack([q, 2 * q])
        a = torch.func.vmap(lambda q: seqkernels.scaled_dot_product_attention(q, k, v))(qs)
        e = torch_math_sdpa(qs, k, v)
    else:
        fn = getattr(torch.func, transform)
        a, e = fn(f_ours)(q), fn(f_ref)(q)
    torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_torch_func_recurrent_says_unsupported():
    m = seqkernels.nn.LSTM(3, 4).double()
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="torch.func transforms"):
        torch.func.grad(lambda x: m(x)[0].sum())(x)


def test_meta_tensors_with_key_lengths():
    q, k, v = (torch.empty(2, 3, n, 8, device="meta") for n in (5, 7, 7))
    out, lse = seqkernels.flash_attention(q, k, v, key_lengths=torch.tensor([7, 3], device="meta"), return_lse=True)
    assert out.shape == (2, 3, 5, 8) and out.device.type == "meta" and lse.shape == (2, 3, 5)
