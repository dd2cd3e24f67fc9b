"""seqkernels.nn.MultiheadAttention against torch.nn.MultiheadAttention, and convert()."""

import copy
from unittest import mock

import pytest
import torch

import seqkernels
from seqkernels import testing
from seqkernels.ops import attention as attn_ops

from ..helpers import grads_of

E, HEADS, N, L, S = 32, 4, 3, 13, 17

CONFIGS = {
    "default": {},
    "batch_first": dict(batch_first=True),
    "bias_kv_zero_attn": dict(add_bias_kv=True, add_zero_attn=True),
    "kdim_vdim": dict(kdim=24, vdim=20),
    "no_bias": dict(bias=False),
}


def pair(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    t = torch.nn.MultiheadAttention(E, HEADS, dtype=dtype, **kw)
    if t.bias_k is not None:  # torch initializes them with xavier_normal_; make them count
        torch.nn.init.normal_(t.bias_k), torch.nn.init.normal_(t.bias_v)
    if t.in_proj_bias is not None:
        torch.nn.init.normal_(t.in_proj_bias, std=0.1)
    m = seqkernels.nn.MultiheadAttention(E, HEADS, dtype=dtype, **kw)
    m.load_state_dict(t.state_dict())
    return t, m


def inputs(batch_first, kdim=E, vdim=E, dtype=torch.float64, self_attention=False):
    g = torch.Generator().manual_seed(1)

    def r(n, d):
        shape = (N, n, d) if batch_first else (n, N, d)
        return torch.randn(shape, generator=g, dtype=dtype).requires_grad_()

    q = r(L, E)
    if self_attention:
        return q, q, q
    return q, r(S, kdim), r(S, vdim)


def masks(kind, Lk=S, dtype=torch.float64):
    g = torch.Generator().manual_seed(2)
    out = {}
    if kind in ("padding", "both", "float"):
        out["key_padding_mask"] = torch.arange(Lk) >= torch.tensor([Lk, 5, 11]).unsqueeze(1)
    if kind in ("attn", "both"):
        m = torch.rand(L, Lk, generator=g) > 0.75
        m[:, 0] = False
        out["attn_mask"] = m
    if kind == "float":
        out["key_padding_mask"] = torch.where(out["key_padding_mask"], float("-inf"), 0.0).to(dtype)
        out["attn_mask"] = torch.randn(N * HEADS, L, Lk, generator=g, dtype=dtype)
    if kind == "scattered":  # not a suffix: stays a mask, not key lengths
        kp = torch.rand(N, Lk, generator=g) > 0.6
        kp[:, 0] = False
        out["key_padding_mask"] = kp
    return out


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("kind", ["none", "padding", "attn", "both", "float", "scattered"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_matches_torch(config, kind, need_weights):
    kw = CONFIGS[config]
    t, m = pair(**kw)
    q, k, v = inputs(kw.get("batch_first", False), kw.get("kdim", E), kw.get("vdim", E))
    mk = masks(kind)
    a, wa = t(q, k, v, need_weights=need_weights, **mk)
    b, wb = m(q, k, v, need_weights=need_weights, **mk)
    testing.assert_close(b, a, torch.float64, 1.0, "out")
    if need_weights:
        testing.assert_close(wb, wa, torch.float64, 1.0, "weights")
    else:
        assert wb is None
    params_t = [q, k, v, *t.parameters()]
    params_m = [q, k, v, *m.parameters()]
    for x, y in zip(grads_of([b], params_m), grads_of([a], params_t)):
        testing.assert_close(x, y, torch.float64, 1.0, "grad")


@pytest.mark.parametrize("batch_first", [False, True])
def test_self_attention_float32_and_per_head_weights(batch_first):
    t, m = pair(dtype=torch.float32, batch_first=batch_first)
    q, _, _ = inputs(batch_first, dtype=torch.float32, self_attention=True)
    kp = masks("padding", Lk=L)["key_padding_mask"]
    for nw in (False, True):
        a, wa = t(q, q, q, key_padding_mask=kp, need_weights=nw, average_attn_weights=False)
        b, wb = m(q, q, q, key_padding_mask=kp, need_weights=nw, average_attn_weights=False)
        testing.assert_close(b, a, torch.float32, 2.0, "out")
        if nw:
            assert wb.shape == (N, HEADS, L, L)
            testing.assert_close(wb, wa, torch.float32, 2.0, "weights")


def test_unbatched_input():
    t, m = pair()
    q = torch.randn(L, E, dtype=torch.float64)
    k = torch.randn(S, E, dtype=torch.float64)
    kp = torch.arange(S) >= 9
    for nw in (False, True):
        a, _ = t(q, k, k, key_padding_mask=kp, need_weights=nw)
        b, _ = m(q, k, k, key_padding_mask=kp, need_weights=nw)
        assert b.shape == (L, E)
        testing.assert_close(b, a, torch.float64)


def test_is_causal_hint():
    t, m = pair(batch_first=True)
    q, _, _ = inputs(True, self_attention=True)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    a, _ = t(q, q, q, attn_mask=causal, is_causal=True, need_weights=False)
    b, _ = m(q, q, q, attn_mask=causal, is_causal=True, need_weights=False)
    testing.assert_close(b, a, torch.float64)
    with pytest.raises(RuntimeError, match="is_causal"):
        m(q, q, q, is_causal=True, need_weights=False)


def test_suffix_padding_becomes_key_lengths():
    """A boolean key_padding_mask that pads a suffix reaches the kernel as key lengths."""
    _, m = pair(batch_first=True)
    q, k, v = inputs(True)
    seen = {}
    real = attn_ops._attention

    def spy(*args):
        seen["mask"], seen["lengths"] = args[6], args[7]
        return real(*args)

    with mock.patch.object(attn_ops, "_attention", spy):
        m(q, k, v, key_padding_mask=masks("padding")["key_padding_mask"], need_weights=False)
    assert seen["mask"] is None and seen["lengths"].tolist() == [S, 5, 11]
    with mock.patch.object(attn_ops, "_attention", spy):
        m(q, k, v, key_padding_mask=masks("scattered")["key_padding_mask"], need_weights=False)
    assert seen["lengths"] is None and seen["mask"].shape == (N, 1, 1, S)


def test_dropout_in_training_only():
    _, m = pair(dropout=0.5, batch_first=True)
    q, k, v = inputs(True)
    m.eval()
    a, _ = m(q, k, v, need_weights=False)
    b, _ = m(q, k, v, need_weights=False)
    assert torch.equal(a, b)
    m.train()
    torch.manual_seed(3)
    c, _ = m(q, k, v, need_weights=False)
    torch.manual_seed(3)
    d, _ = m(q, k, v, need_weights=False)
    assert torch.equal(c, d) and not torch.allclose(a, c)
    grads_of([c], [q, *m.parameters()])


@pytest.mark.parametrize("call,exc,match", [
    (lambda m, q, k: m(q, k, k, key_padding_mask=torch.zeros(N, S + 1, dtype=torch.bool)), ValueError,
     "key_padding_mask"),
    (lambda m, q, k: m(q, k, k, attn_mask=torch.zeros(L, S + 1, dtype=torch.bool)), ValueError, "attn_mask"),
    (lambda m, q, k: m(q, k, k, attn_mask=torch.zeros(L, S, dtype=torch.int64)), TypeError, "attn_mask"),
    (lambda m, q, k: m(q[..., :-1], k, k), ValueError, "embed_dim"),
    (lambda m, q, k: m(q, k[:, :2], k[:, :2]), ValueError, "batch"),
    (lambda m, q, k: m(q, k[0], k[0]), ValueError, "2-D"),
])
def test_bad_input(call, exc, match):
    _, m = pair()
    q, k, _ = inputs(False)
    with pytest.raises(exc, match=match):
        call(m, q, k)


@pytest.mark.parametrize("train", [True, False])
def test_convert_transformer_encoder(train):
    torch.manual_seed(4)
    layer = torch.nn.TransformerEncoderLayer(E, HEADS, 64, dropout=0.0, batch_first=True)
    enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    twin = copy.deepcopy(enc)
    params = list(enc.parameters())
    assert seqkernels.nn.convert(enc) is enc
    assert all(type(lyr.self_attn) is seqkernels.nn.MultiheadAttention for lyr in enc.layers)
    assert list(enc.parameters()) == params  # the same tensors
    x = torch.randn(N, L, E)
    kp = torch.arange(L) >= torch.tensor([L, 6, 9]).unsqueeze(1)
    enc.train(train), twin.train(train)
    calls = []
    real = attn_ops._attention
    with mock.patch.object(attn_ops, "_attention", lambda *a: calls.append(1) or real(*a)):
        with torch.no_grad():
            a = twin(x, src_key_padding_mask=kp)
            b = enc(x, src_key_padding_mask=kp)
    assert len(calls) == 2, "the converted attention did not run"
    if a.is_nested:  # torch's inference path drops the padded rows
        a = a.to_padded_tensor(0.0)
    keep = ~kp
    testing.assert_close(b[keep], a[keep], torch.float32, 4.0, "encoder out")


def test_torch_compile_fullgraph():
    """A compiled self-attention call (key padding, need_weights=False) matches eager, with
    gradients; the heads are strided views of the projection, as in real models."""
    _, m = pair(dtype=torch.float32, batch_first=True)
    x = torch.randn(N, L, E, requires_grad=True)
    kp = masks("padding", Lk=L)["key_padding_mask"]

    def f(x):
        return m(x, x, x, key_padding_mask=kp, need_weights=False)[0]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a, b = compiled(x), f(x)
    torch.testing.assert_close(a, b)
    for ga, gb in zip(grads_of([a], [x, *m.parameters()]), grads_of([b], [x, *m.parameters()])):
        torch.testing.assert_close(ga, gb)
