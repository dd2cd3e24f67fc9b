"""The attention modules against torch's: a converted TransformerEncoder's padded rows
(item 6), MultiheadAttention's is_causal hint (14) and its exception types (12)."""

from __future__ import annotations

import copy

import pytest
import torch

import seqkernels

from .helpers import assert_raises_like_torch


def _encoder(norm: bool, batch_first: bool = True):
    layer = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=batch_first)
    return torch.nn.TransformerEncoder(layer, 2, norm=torch.nn.LayerNorm(16) if norm else None,
                                       enable_nested_tensor=True)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.filterwarnings("ignore:enable_nested_tensor")
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_converted_encoder_matches_torch_with_padding(training, norm, grad):
    theirs = _encoder(norm)
    with torch.no_grad():
        for p in theirs.parameters():  # LayerNorm weights away from 1/0, so norm(0) is visible
            p.add_(0.1 * torch.randn_like(p))
    ours = seqkernels.nn.convert(copy.deepcopy(theirs))
    theirs.train(training)
    ours.train(training)
    x = torch.randn(3, 7, 16)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, 5:] = True
    pad[2, 2:] = True
    with torch.set_grad_enabled(grad):
        e = theirs(x, src_key_padding_mask=pad)
        a = ours(x, src_key_padding_mask=pad)
    torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
    if not training and not grad:  # torch's nested-tensor path: padded rows are zeros (then norm)
        assert ours.layers[0].self_attn.__class__ is seqkernels.nn.MultiheadAttention
        if not norm:
            assert torch.equal(a[pad], torch.zeros_like(a[pad]))


def _mha_pair(**kw):
    theirs = torch.nn.MultiheadAttention(16, 2, batch_first=True, **kw)
    ours = seqkernels.nn.MultiheadAttention(16, 2, batch_first=True, **kw)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


@pytest.mark.parametrize("mask_shape", [(3, 3), (7, 7), (4, 7, 7)])
def test_mha_is_causal_hint_drops_the_mask_like_torch(mask_shape):
    theirs, ours = _mha_pair()
    x = torch.randn(2, 7, 16)
    m = torch.ones(mask_shape, dtype=torch.bool)
    kw = dict(attn_mask=m, is_causal=True, need_weights=False)
    torch.testing.assert_close(ours(x, x, x, **kw)[0], theirs(x, x, x, **kw)[0], rtol=1e-5, atol=1e-6)


BAD_MHA = {
    "embed dim": lambda m, x: m(torch.randn(2, 7, 15), x, x, need_weights=False),
    "kdim": lambda m, x: m(x, torch.randn(2, 7, 8), x, need_weights=False),
    "key/value lengths": lambda m, x: m(x, x, x[:, :5], need_weights=False),
    "key_padding_mask shape": lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool),
                                             need_weights=False),
    "attn_mask shape": lambda m, x: m(x, x, x, attn_mask=torch.zeros(6, 7, dtype=torch.bool), need_weights=False),
    "attn_mask 3-D heads": lambda m, x: m(x, x, x, attn_mask=torch.zeros(3, 7, 7, dtype=torch.bool)),
    "mask dtype": lambda m, x: m(x, x, x, attn_mask=torch.zeros(7, 7, dtype=torch.int64), need_weights=False),
    "is_causal without mask": lambda m, x: m(x, x, x, is_causal=True),
    "rank 4": lambda m, x: m(x[None], x[None], x[None]),
}


@pytest.mark.parametrize("name", list(BAD_MHA))
def test_mha_errors_are_torchs_types(name):
    theirs, ours = _mha_pair()
    x = torch.randn(2, 7, 16)
    assert_raises_like_torch(lambda: BAD_MHA[name](ours, x), lambda: BAD_MHA[name](theirs, x))
