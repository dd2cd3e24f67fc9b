"""Reference attention: softmax(Q K^T * scale + mask) V with the full (Lq, Lk) matrix.

This materializes the n x n score matrix on purpose: it is the textbook definition, the
oracle the fused kernels are tested against, and the O(n^2) curve of the memory profile.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def causal_mask(lq: int, lk: int, bottom_right: bool = False, device=None) -> Tensor:
    """Boolean (lq, lk) mask, True where query i may attend key j.

    Top-left (torch's ``is_causal``): j <= i.
    Bottom-right (FlashAttention's convention, as decoding needs): j <= i + lk - lq, so the
    last query sees every key. The two agree when lq == lk.
    """
    i = torch.arange(lq, device=device).unsqueeze(1)
    j = torch.arange(lk, device=device).unsqueeze(0)
    return j <= i + (lk - lq if bottom_right else 0)


def _safe_softmax(scores: Tensor) -> Tensor:
    """softmax over the last dim; a row that is entirely -inf gives zeros, not NaN."""
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(scores - row_max)
    s = e.sum(dim=-1, keepdim=True)
    return e / torch.where(s == 0, torch.ones_like(s), s)


def _expand_kv_heads(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Grouped-query attention: repeat each k/v head over its group of query heads."""
    hq, hk = q.shape[-3], k.shape[-3]
    if hq % hk != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hk})")
    g = hq // hk
    return k.repeat_interleave(g, dim=-3), v.repeat_interleave(g, dim=-3)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    dropout_mask: Optional[Tensor] = None,
    return_probs: bool = False,
):
    """The semantics of ``torch.nn.functional.scaled_dot_product_attention``.

    out = dropout(softmax(Q K^T * scale + bias)) V, with scale = 1/sqrt(E) by default and
    bias built from ``is_causal`` (top-left: query i sees keys j <= i) and ``attn_mask``
    (boolean: True = takes part; float: added to the scores), broadcast to (..., L, S).
    ``enable_gqa`` repeats the key/value heads (dim -3) to the query heads.

    Dropout zeroes probabilities with probability ``dropout_p`` and scales the kept ones by
    1/(1-p); ``dropout_mask`` (boolean, True = kept) fixes which, for tests.

    A row with no visible key gives zeros (torch's math backend does the same).
    Returns out (..., L, Ev), or (out, probs) with ``return_probs`` (probs after dropout).
    """
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask and is_causal cannot both be set")
    L, S = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa:
        key, value = _expand_kv_heads(query, key, value)
    scores = (query @ key.transpose(-2, -1)) * scale
    if is_causal:
        attn_mask = causal_mask(L, S, bottom_right=False, device=query.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    probs = _safe_softmax(scores)
    if dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = torch.rand_like(probs) >= dropout_p
        probs = probs * dropout_mask / (1.0 - dropout_p)
    out = probs @ value
    return (out, probs) if return_probs else out


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    scale: Optional[float] = None,
    bottom_right: bool = True,
    *,
    attn_mask: Optional[Tensor] = None,
    key_lengths: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    dropout_mask: Optional[Tensor] = None,
    softcap: float = 0.0,
    window: tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """The convention of :func:`seqkernels.flash_attention`, materialized.

    q (B, H, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv) with Hk dividing H (grouped-query
    heads). ``causal`` aligns the mask bottom-right by default (query i sees keys
    j <= i + Lk - Lq), top-left with ``bottom_right=False``. ``attn_mask`` broadcasts to
    (B, H, Lq, Lk): boolean (True = takes part) or added to the scaled scores.
    ``key_lengths`` (B,): keys j >= key_lengths[b] are masked. Dropout with probability
    ``dropout_p`` keeps the probabilities where ``dropout_mask`` (boolean, broadcast to
    (B, H, Lq, Lk)) is True, scaled by 1/(1-p); random when no mask is given. ``softcap`` > 0
    maps every scaled score s to softcap * tanh(s / softcap) before the masks. ``window``
    (left, right): query i sees keys i + off - left <= j <= i + off + right, off aligned as
    the causal mask (Lk - Lq bottom-right, 0 top-left); -1 = unbounded. ``alibi_slopes``
    (H,) or (B, H): ALiBi, score += -slope * |i + off - j| after the cap, off aligned as the
    window.

    Returns (out (B, H, Lq, Dv), lse (B, H, Lq)) where lse is the log-sum-exp of each row of
    scaled, masked scores before dropout (-inf for a row that sees no key, whose output is
    zero).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k, v = _expand_kv_heads(q, k, v)
    scores = (q @ k.transpose(-2, -1)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    Lq, Lk = q.shape[-2], k.shape[-2]
    # query i sits at key position i + off (the causal alignment), for ALiBi and the window
    i = torch.arange(Lq, device=q.device)[:, None] + (Lk - Lq if bottom_right else 0)
    j = torch.arange(Lk, device=q.device)[None, :]
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(scores.dtype)
        slopes = slopes[:, :, None, None] if slopes.dim() == 2 else slopes[None, :, None, None]
        scores = scores - slopes * (i - j).abs().to(scores.dtype)
    if causal:
        mask = causal_mask(Lq, Lk, bottom_right=bottom_right, device=q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
    left, right = window
    if left >= 0 or right >= 0:
        inside = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
        if left >= 0:
            inside &= j >= i - left
        if right >= 0:
            inside &= j <= i + right
        scores = scores.masked_fill(~inside, float("-inf"))
    if key_lengths is not None:
        pad = torch.arange(Lk, device=q.device) >= key_lengths.reshape(-1, 1, 1, 1)
        scores = scores.masked_fill(pad, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    lse = torch.logsumexp(scores, dim=-1)
    probs = _safe_softmax(scores)
    if dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = torch.rand_like(probs) >= dropout_p
        probs = probs * dropout_mask / (1.0 - dropout_p)
    return probs @ v, lse


def kvcache_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    cache_seqlens=None,
    block_table: Optional[Tensor] = None,
    causal: bool = True,
    scale: Optional[float] = None,
    softcap: float = 0.0,
    window: tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The semantics of :func:`seqkernels.flash_attention_with_kvcache`, without writing in
    place: returns (out, lse, new k_cache, new v_cache), one sequence at a time.

    Sequence b's keys are positions 0 .. cache_seqlens[b] + Lnew - 1 of its cache (the new
    k/v at the end); position p is row p of k_cache[b], or, with a block table, row
    p % block_size of block block_table[b, p // block_size] of the pool. Causal is
    bottom-right on each sequence's own length.
    """
    B, H, Lq, D = q.shape
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    Lnew = 0 if k is None else k.shape[2]
    if cache_seqlens is None:
        cache_seqlens = (block_table.shape[1] * k_cache.shape[2]) if block_table is not None else k_cache.shape[2]
    seqlens = [int(cache_seqlens)] * B if isinstance(cache_seqlens, int) else [int(x) for x in cache_seqlens]

    def rows(b: int, n: int) -> tuple[Tensor, Tensor]:
        """(block or batch index, row) of positions 0..n-1 of sequence b."""
        p = torch.arange(n)
        if block_table is None:
            return torch.full((n,), b, dtype=torch.long), p
        bs = k_cache.shape[2]
        return block_table[b].long().cpu()[p // bs], p % bs

    outs, lses = [], []
    for b in range(B):
        n = seqlens[b] + Lnew
        if Lnew:
            blk, r = rows(b, n)
            blk, r = blk[seqlens[b]:], r[seqlens[b]:]
            k_cache[blk, :, r] = k[b].transpose(0, 1).to(k_cache.dtype)
            v_cache[blk, :, r] = v[b].transpose(0, 1).to(v_cache.dtype)
        blk, r = rows(b, n)
        kb = k_cache[blk, :, r].transpose(0, 1)[None]  # (1, Hk, n, D)
        vb = v_cache[blk, :, r].transpose(0, 1)[None]
        if n == 0:
            outs.append(q.new_zeros(1, H, Lq, v_cache.shape[-1]))
            lses.append(torch.full((1, H, Lq), float("-inf"), dtype=q.dtype))
            continue
        slopes = None if alibi_slopes is None else (alibi_slopes[b:b + 1] if alibi_slopes.dim() == 2 else alibi_slopes)
        o, lse = flash_attention(q[b:b + 1], kb.to(q.dtype), vb.to(q.dtype), causal=causal, scale=scale,
                                 softcap=softcap, window=window, alibi_slopes=slopes)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses), k_cache, v_cache


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    causal: bool = False,
    scale: Optional[float] = None,
    *,
    softcap: float = 0.0,
    window: tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    dropout_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """The semantics of :func:`seqkernels.flash_attention_varlen`, one sequence at a time.

    Packed batches (flash-attn's layout): q (total_q, H, D), k (total_k, Hk, D), v (total_k,
    Hk, Dv); sequence b is rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 of q and the same
    of cu_seqlens_k for k and v. Each sequence is :func:`flash_attention` on its own (causal,
    the window and ALiBi bottom-right on its own lengths; ``alibi_slopes`` (H,) or (B, H)).
    ``dropout_mask`` (1, H, total_q, >= the longest key sequence), boolean, True = kept: row
    cu_seqlens_q[b] + i, key j of sequence b.

    Returns (out (total_q, H, Dv), lse (H, total_q)); a sequence without keys gives zero
    rows and LSE -inf.
    """
    cq = [int(x) for x in cu_seqlens_q.tolist()]
    ck = [int(x) for x in cu_seqlens_k.tolist()]
    H, Dv = q.shape[1], v.shape[2]
    out = q.new_zeros(q.shape[0], H, Dv)
    lse = torch.full((H, q.shape[0]), float("-inf"), dtype=q.dtype, device=q.device)
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        if cq[b + 1] == cq[b] or ck[b + 1] == ck[b]:
            outs.append(out[qs])
            lses.append(lse[:, qs])
            continue
        slopes = alibi_slopes
        if slopes is not None and slopes.dim() == 2:
            slopes = slopes[b:b + 1]
        keep = None if dropout_mask is None else dropout_mask[:, :, qs, :ck[b + 1] - ck[b]]
        o, l = flash_attention(q[qs].transpose(0, 1)[None], k[ks].transpose(0, 1)[None], v[ks].transpose(0, 1)[None],
                               causal=causal, scale=scale, softcap=softcap, window=window, alibi_slopes=slopes,
                               dropout_p=dropout_p, dropout_mask=keep)
        outs.append(o[0].transpose(0, 1))
        lses.append(l[0])
    if not outs:
        return out, lse
    return torch.cat(outs), torch.cat(lses, dim=1)
