"""Items 5 and 8: compiled calls check key_lengths too; every op passes opcheck with
non-contiguous inputs (the fake kernels describe the real outputs' strides)."""

from __future__ import annotations

import pytest
import torch

import seqkernels

OPS = torch.ops.seqkernels


def test_compiled_call_checks_key_lengths():
    q, k, v = (torch.randn(2, 3, n, 8) for n in (5, 7, 7))
    f = torch.compile(lambda q, k, v, kl: seqkernels.flash_attention(q, k, v, key_lengths=kl), fullgraph=True)
    f(q, k, v, torch.tensor([7, 3]))
    for bad in ([7, -5], [8, 7]):
        with pytest.raises(ValueError, match="key_lengths must lie in"):
            f(q, k, v, torch.tensor(bad))


def _noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a transposed layout (strides that are not row-major)."""
    return t.transpose(0, -1).contiguous().transpose(0, -1) if t.dim() > 1 else t


def _strided(*ts):
    out = tuple(_noncontiguous(t) if isinstance(t, torch.Tensor) else t for t in ts)
    assert any(isinstance(t, torch.Tensor) and t.dim() > 1 and not t.is_contiguous() for t in out)
    return out


@pytest.mark.parametrize("mask", [False, True])
def test_opcheck_attention_strided(mask):
    q, k, v = (torch.randn(2, 4, n, 8, dtype=torch.float64) for n in (5, 7, 7))
    m = torch.rand(2, 1, 5, 7) > 0.3 if mask else None
    kl = torch.tensor([7, 4])
    args = _strided(q, k, v) + (True, False, 0.3, m, kl)
    torch.library.opcheck(OPS.flash_attention_forward, args)
    out, lse = OPS.flash_attention_forward(*args)
    bargs = _strided(torch.randn_like(out), torch.randn_like(lse), *args[:3], out, lse) + args[3:]
    torch.library.opcheck(OPS.flash_attention_backward, bargs)


@pytest.mark.parametrize("proj", [False, True])
def test_opcheck_lstm_strided(proj):
    T, B, I, H = 4, 3, 5, 6
    P = 2 if proj else H
    x, h0, c0 = torch.randn(T, B, I, dtype=torch.float64), torch.randn(B, P, dtype=torch.float64), \
        torch.randn(B, H, dtype=torch.float64)
    w_ih, w_hh = torch.randn(4 * H, I, dtype=torch.float64), torch.randn(4 * H, P, dtype=torch.float64)
    bias = torch.randn(4 * H, dtype=torch.float64)
    w_hr = torch.randn(P, H, dtype=torch.float64) if proj else None
    args = _strided(x, h0, c0, w_ih, w_hh) + (bias, w_hr, torch.tensor([4, 2, 3]), False)
    torch.library.opcheck(OPS.lstm_layer_forward, args)
    y, hn, cn, gates, hs, cs, rs = OPS.lstm_layer_forward(*args)
    bargs = _strided(torch.randn_like(y), torch.randn_like(hn), torch.randn_like(cn), *args[:5]) + (
        w_hr, args[7], False, gates, y, hs, cs, rs, True)
    torch.library.opcheck(OPS.lstm_layer_backward, bargs)


def test_opcheck_rnn_strided():
    T, B, I, H = 4, 3, 5, 6
    x, h0 = torch.randn(T, B, I, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    w_ih, w_hh = torch.randn(H, I, dtype=torch.float64), torch.randn(H, H, dtype=torch.float64)
    args = _strided(x, h0, w_ih, w_hh) + (torch.randn(H, dtype=torch.float64), None, True, False)
    torch.library.opcheck(OPS.rnn_layer_forward, args)
    y, hn, hs = OPS.rnn_layer_forward(*args)
    bargs = _strided(torch.randn_like(y), torch.randn_like(hn), *args[:4]) + (None, True, False, y, hs, True)
    torch.library.opcheck(OPS.rnn_layer_backward, bargs)


@pytest.mark.parametrize("batch_first", [False, True])
def test_compiled_fullgraph_lstm_training_matches_eager(batch_first):
    m = seqkernels.nn.LSTM(5, 4, num_layers=2, batch_first=batch_first, bidirectional=True)
    x = torch.randn(3, 6, 5).transpose(0, 1) if not batch_first else torch.randn(6, 3, 5).transpose(0, 1)
    x.requires_grad_()
    assert not x.is_contiguous()
    f = torch.compile(lambda x: m(x)[0].sin().sum(), fullgraph=True)
    f(x).backward()
    g = x.grad.clone()
    x.grad = None
    m(x)[0].sin().sum().backward()
    torch.testing.assert_close(g, x.grad)
