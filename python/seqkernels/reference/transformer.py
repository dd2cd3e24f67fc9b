"""Reference multi-head attention and transformer layers, parameterized as torch.nn.

:func:`multi_head_attention` takes the parameters of ``torch.nn.MultiheadAttention``;
:func:`transformer_encoder_layer` and :func:`transformer_decoder_layer` take the
``state_dict`` of ``torch.nn.TransformerEncoderLayer`` / ``TransformerDecoderLayer``.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
from torch import Tensor

from .attention import scaled_dot_product_attention


def _linear(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    y = x @ w.t()
    return y if b is None else y + b


def _to_additive(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """torch.nn's masks: boolean True means *masked out*; float masks are added."""
    if mask is None or mask.dtype != torch.bool:
        return mask if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


def multi_head_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    num_heads: int,
    in_proj_weight: Optional[Tensor],
    in_proj_bias: Optional[Tensor],
    out_proj_weight: Tensor,
    out_proj_bias: Optional[Tensor],
    *,
    q_proj_weight: Optional[Tensor] = None,
    k_proj_weight: Optional[Tensor] = None,
    v_proj_weight: Optional[Tensor] = None,
    bias_k: Optional[Tensor] = None,
    bias_v: Optional[Tensor] = None,
    add_zero_attn: bool = False,
    dropout_p: float = 0.0,
    key_padding_mask: Optional[Tensor] = None,
    need_weights: bool = True,
    attn_mask: Optional[Tensor] = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    batch_first: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """Multi-head attention with the parameterization of ``torch.nn.MultiheadAttention``.

    Q = query W_q^T + b_q, K = key W_k^T + b_k, V = value W_v^T + b_v (W_q, W_k, W_v are
    the three row blocks of ``in_proj_weight``, or the separate ``*_proj_weight`` when
    kdim/vdim differ from embed_dim); each of the ``num_heads`` heads attends with
    softmax(Q_h K_h^T / sqrt(E/num_heads) + mask) V_h; heads are concatenated and
    projected: out = concat(heads) W_o^T + b_o.

    ``bias_k``/``bias_v`` append one learned key/value; ``add_zero_attn`` appends a zero
    key/value. Masks follow torch.nn: boolean True = *not allowed*, float = added.
    ``attn_mask`` is (L, S) or (N * num_heads, L, S); ``key_padding_mask`` is (N, S).
    ``is_causal`` is a hint that ``attn_mask`` is the causal mask (which must be given).

    query (L, N, E) (or (N, L, E) with ``batch_first``, or (L, E) unbatched).
    Returns (out, weights): weights (N, L, S) averaged over heads, or (N, num_heads, L, S),
    or None when ``need_weights`` is False.
    """
    if is_causal and attn_mask is None:
        raise ValueError("is_causal is a hint: it needs attn_mask to be the causal mask")
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    L, N, E = query.shape
    head_dim = E // num_heads

    if in_proj_weight is not None:
        w_q, w_k, w_v = in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = q_proj_weight, k_proj_weight, v_proj_weight
    b_q, b_k, b_v = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
    q, k, v = _linear(query, w_q, b_q), _linear(key, w_k, b_k), _linear(value, w_v, b_v)

    attn_mask = _to_additive(attn_mask, q.dtype)
    key_padding_mask = _to_additive(key_padding_mask, q.dtype)
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)

    def append_key(k, v, new_k, new_v):
        """Append one key/value position; masks get a column that lets it take part."""
        nonlocal attn_mask, key_padding_mask
        k, v = torch.cat([k, new_k]), torch.cat([v, new_v])
        if attn_mask is not None:
            attn_mask = torch.nn.functional.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = torch.nn.functional.pad(key_padding_mask, (0, 1))
        return k, v

    if bias_k is not None and bias_v is not None:
        k, v = append_key(k, v, bias_k.expand(1, N, E), bias_v.expand(1, N, E))
    if add_zero_attn:
        k, v = append_key(k, v, k.new_zeros(1, N, E), v.new_zeros(1, N, E))
    S = k.shape[0]

    # (len, N, E) -> (N, heads, len, head_dim)
    def heads(t):
        return t.reshape(t.shape[0], N, num_heads, head_dim).permute(1, 2, 0, 3)

    q, k, v = heads(q), heads(k), heads(v)
    bias = torch.zeros(N, num_heads, L, S, dtype=q.dtype, device=q.device)
    if attn_mask is not None:
        bias = bias + attn_mask.reshape(-1, L, S).expand(N * num_heads, L, S).reshape(N, num_heads, L, S)
    if key_padding_mask is not None:
        bias = bias + key_padding_mask.reshape(N, 1, 1, S)
    out, probs = scaled_dot_product_attention(
        q, k, v, attn_mask=bias, dropout_p=dropout_p, return_probs=True
    )
    out = out.permute(2, 0, 1, 3).reshape(L, N, E)
    out = _linear(out, out_proj_weight, out_proj_bias)

    if unbatched:
        out = out.squeeze(1)
    elif batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    weights = probs.mean(dim=1) if average_attn_weights else probs
    return out, (weights.squeeze(0) if unbatched else weights)


def positional_encoding(seq_len: int, d_model: int, base: float = 10000.0,
                        dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """Sinusoidal positional encoding of "Attention Is All You Need", shape (seq_len, d_model).

    PE[pos, 2i] = sin(pos / base^(2i/d_model)),  PE[pos, 2i+1] = cos(pos / base^(2i/d_model)).
    """
    pos = torch.arange(seq_len, dtype=torch.float64, device=device).unsqueeze(1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64, device=device)
    angle = pos / base ** (two_i / d_model)
    pe = torch.zeros(seq_len, d_model, dtype=torch.float64, device=device)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    return pe.to(dtype)


def _layer_norm(x: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    """(x - mean) / sqrt(var + eps) * w + b over the last dim (biased variance)."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def _activation(x: Tensor, name: str) -> Tensor:
    if name == "relu":
        return torch.clamp_min(x, 0)
    if name == "gelu":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2.0)))
    raise ValueError(f"activation must be 'relu' or 'gelu', got {name!r}")


def _mha_block(p: Mapping[str, Tensor], prefix: str, q, kv, nhead, attn_mask, key_padding_mask,
               is_causal, dropout, batch_first):
    out, _ = multi_head_attention(
        q, kv, kv, nhead,
        p[prefix + "in_proj_weight"], p.get(prefix + "in_proj_bias"),
        p[prefix + "out_proj.weight"], p.get(prefix + "out_proj.bias"),
        attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False,
        is_causal=is_causal, dropout_p=dropout, batch_first=batch_first)
    return out


def _feed_forward(p, x, activation, dropout):
    h = _activation(_linear(x, p["linear1.weight"], p.get("linear1.bias")), activation)
    h = torch.nn.functional.dropout(h, dropout) if dropout > 0 else h
    return _linear(h, p["linear2.weight"], p.get("linear2.bias"))


def _norm(p, name, x, eps):
    return _layer_norm(x, p[name + ".weight"], p.get(name + ".bias", torch.zeros_like(p[name + ".weight"])), eps)


def transformer_encoder_layer(
    src: Tensor,
    params: Mapping[str, Tensor],
    nhead: int,
    *,
    src_mask: Optional[Tensor] = None,
    src_key_padding_mask: Optional[Tensor] = None,
    is_causal: bool = False,
    norm_first: bool = False,
    activation: str = "relu",
    layer_norm_eps: float = 1e-5,
    batch_first: bool = False,
    dropout: float = 0.0,
) -> Tensor:
    """``torch.nn.TransformerEncoderLayer``: self-attention and feed-forward with residuals.

    Post-norm: x = LN1(x + SA(x)); x = LN2(x + FF(x)).
    Pre-norm (``norm_first``): x = x + SA(LN1(x)); x = x + FF(LN2(x)).
    FF(x) = act(x W_1^T + b_1) W_2^T + b_2. ``params`` is the layer's state_dict.
    """

    def sa(x):
        return _mha_block(params, "self_attn.", x, x, nhead, src_mask, src_key_padding_mask,
                          is_causal, dropout, batch_first)

    x = src
    if norm_first:
        x = x + sa(_norm(params, "norm1", x, layer_norm_eps))
        x = x + _feed_forward(params, _norm(params, "norm2", x, layer_norm_eps), activation, dropout)
    else:
        x = _norm(params, "norm1", x + sa(x), layer_norm_eps)
        x = _norm(params, "norm2", x + _feed_forward(params, x, activation, dropout), layer_norm_eps)
    return x


def transformer_decoder_layer(
    tgt: Tensor,
    memory: Tensor,
    params: Mapping[str, Tensor],
    nhead: int,
    *,
    tgt_mask: Optional[Tensor] = None,
    memory_mask: Optional[Tensor] = None,
    tgt_key_padding_mask: Optional[Tensor] = None,
    memory_key_padding_mask: Optional[Tensor] = None,
    tgt_is_causal: bool = False,
    memory_is_causal: bool = False,
    norm_first: bool = False,
    activation: str = "relu",
    layer_norm_eps: float = 1e-5,
    batch_first: bool = False,
    dropout: float = 0.0,
) -> Tensor:
    """``torch.nn.TransformerDecoderLayer``: self-attention, cross-attention, feed-forward.

    Post-norm: x = LN1(x + SA(x)); x = LN2(x + CA(x, memory)); x = LN3(x + FF(x)).
    Pre-norm (``norm_first``): x = x + SA(LN1(x)); x = x + CA(LN2(x), memory); x = x + FF(LN3(x)).
    """

    def sa(x):
        return _mha_block(params, "self_attn.", x, x, nhead, tgt_mask, tgt_key_padding_mask,
                          tgt_is_causal, dropout, batch_first)

    def ca(x):
        return _mha_block(params, "multihead_attn.", x, memory, nhead, memory_mask,
                          memory_key_padding_mask, memory_is_causal, dropout, batch_first)

    x = tgt
    eps = layer_norm_eps
    if norm_first:
        x = x + sa(_norm(params, "norm1", x, eps))
        x = x + ca(_norm(params, "norm2", x, eps))
        x = x + _feed_forward(params, _norm(params, "norm3", x, eps), activation, dropout)
    else:
        x = _norm(params, "norm1", x + sa(x), eps)
        x = _norm(params, "norm2", x + ca(x), eps)
        x = _norm(params, "norm3", x + _feed_forward(params, x, activation, dropout), eps)
    return x
