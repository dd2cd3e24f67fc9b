"""MHA, positional encoding and transformer layers against torch.nn in float64 (1e-10)."""

import math

import pytest
import torch

from seqkernels import reference as ref
from tests.helpers import assert_all_close, grads_of

D = torch.float64


def mha_ref(m, q, k, v, **kw):
    return ref.multi_head_attention(
        q, k, v, m.num_heads, m.in_proj_weight, m.in_proj_bias, m.out_proj.weight, m.out_proj.bias,
        q_proj_weight=m.q_proj_weight, k_proj_weight=m.k_proj_weight, v_proj_weight=m.v_proj_weight,
        bias_k=m.bias_k, bias_v=m.bias_v, add_zero_attn=m.add_zero_attn, batch_first=m.batch_first, **kw)


MHA_CASES = [
    dict(),
    dict(bias=False),
    dict(add_bias_kv=True),
    dict(add_zero_attn=True),
    dict(add_bias_kv=True, add_zero_attn=True, batch_first=True),
    dict(kdim=5, vdim=7),
    dict(kdim=5, vdim=7, batch_first=True, add_bias_kv=True),
]


@pytest.mark.parametrize("ctor", MHA_CASES)
@pytest.mark.parametrize("masks", ["none", "attn_bool", "attn_float3d", "padding", "both"])
@pytest.mark.parametrize("average", [True, False])
def test_mha_matches_torch(ctor, masks, average):
    E, H, L, S, N = 12, 3, 5, 7, 2
    m = torch.nn.MultiheadAttention(E, H, dtype=D, **ctor)
    bf = ctor.get("batch_first", False)
    kd, vd = ctor.get("kdim", E), ctor.get("vdim", E)

    def seq(n, d):
        return torch.randn((N, n, d) if bf else (n, N, d), dtype=D, requires_grad=True)

    q, k, v = seq(L, E), seq(S, kd), seq(S, vd)
    kw = dict(need_weights=True, average_attn_weights=average)
    if masks in ("attn_bool", "both"):
        am = torch.rand(L, S) > 0.7
        am[:, 0] = False  # False = allowed in torch.nn: every row keeps a key
        kw["attn_mask"] = am
    if masks == "attn_float3d":
        kw["attn_mask"] = torch.randn(N * H, L, S, dtype=D)
    if masks in ("padding", "both"):
        kpm = torch.zeros(N, S, dtype=torch.bool)
        kpm[0, -3:] = True
        kw["key_padding_mask"] = kpm
    out_e, w_e = m(q, k, v, **kw)
    out_a, w_a = mha_ref(m, q, k, v, **kw)
    assert_all_close([out_a, w_a], [out_e, w_e])
    wrt = [q, k, v, *m.parameters()]
    assert_all_close(grads_of([out_a, w_a], wrt), grads_of([out_e, w_e], wrt))


def test_mha_unbatched_and_causal_hint():
    E, H, L = 8, 2, 6
    m = torch.nn.MultiheadAttention(E, H, dtype=D)
    x = torch.randn(L, E, dtype=D, requires_grad=True)
    causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
    out_e, w_e = m(x, x, x, attn_mask=causal, is_causal=True)
    out_a, w_a = mha_ref(m, x, x, x, attn_mask=causal, is_causal=True)
    assert_all_close([out_a, w_a], [out_e, w_e])
    out_a, w_none = mha_ref(m, x, x, x, need_weights=False, attn_mask=causal)
    assert w_none is None
    with pytest.raises(ValueError, match="is_causal"):
        mha_ref(m, x, x, x, is_causal=True)


def test_positional_encoding_formula():
    pe = ref.positional_encoding(50, 10, dtype=D)
    assert pe.shape == (50, 10)
    for pos in (0, 1, 17, 49):
        for i in range(5):
            ang = pos / 10000 ** (2 * i / 10)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(ang), abs=1e-14)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(ang), abs=1e-14)
    odd = ref.positional_encoding(4, 7, dtype=D)
    assert odd.shape == (4, 7) and odd[1, 6].item() == pytest.approx(math.sin(1 / 10000 ** (6 / 7)))


LAYER_CASES = [
    dict(),
    dict(norm_first=True),
    dict(activation="gelu", batch_first=True),
    dict(norm_first=True, activation="gelu", batch_first=True),
]


@pytest.mark.parametrize("cfg", LAYER_CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_encoder_layer_matches_torch(cfg, masked):
    E, H, L, N = 12, 3, 6, 2
    m = torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=20, dropout=0.0, dtype=D, **cfg)
    bf = cfg.get("batch_first", False)
    x = torch.randn((N, L, E) if bf else (L, N, E), dtype=D, requires_grad=True)
    kw = {}
    if masked:
        kw["src_mask"] = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
        kpm = torch.zeros(N, L, dtype=torch.bool)
        kpm[1, -2:] = True
        kw["src_key_padding_mask"] = kpm
    exp = m(x, **kw)
    act = ref.transformer_encoder_layer(x, dict(m.named_parameters()), H, activation=cfg.get("activation", "relu"),
                                        norm_first=cfg.get("norm_first", False), batch_first=bf, **kw)
    assert_all_close([act], [exp])
    wrt = [x, *m.parameters()]
    assert_all_close(grads_of([act], wrt), grads_of([exp], wrt))


@pytest.mark.parametrize("cfg", LAYER_CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_decoder_layer_matches_torch(cfg, masked):
    E, H, L, S, N = 12, 3, 5, 7, 2
    m = torch.nn.TransformerDecoderLayer(E, H, dim_feedforward=20, dropout=0.0, dtype=D, **cfg)
    bf = cfg.get("batch_first", False)
    tgt = torch.randn((N, L, E) if bf else (L, N, E), dtype=D, requires_grad=True)
    mem = torch.randn((N, S, E) if bf else (S, N, E), dtype=D, requires_grad=True)
    kw = {}
    if masked:
        kw["tgt_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=D)
        kpm = torch.zeros(N, S, dtype=torch.bool)
        kpm[0, -3:] = True
        kw["memory_key_padding_mask"] = kpm
    exp = m(tgt, mem, **kw)
    act = ref.transformer_decoder_layer(tgt, mem, dict(m.named_parameters()), H,
                                        activation=cfg.get("activation", "relu"),
                                        norm_first=cfg.get("norm_first", False), batch_first=bf, **kw)
    assert_all_close([act], [exp])
    wrt = [tgt, mem, *m.parameters()]
    assert_all_close(grads_of([act], wrt), grads_of([exp], wrt))
