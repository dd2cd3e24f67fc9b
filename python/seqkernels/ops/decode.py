"""Attention against a KV cache: ``seqkernels::flash_attention_kvcache`` and the public
:func:`flash_attention_with_kvcache`.

The schema is in ``csrc/seqkernels.cpp`` (the caches are declared mutated); the CPU body
is ``csrc/attention/kvcache_cpu.cpp`` on the decode kernel of ``csrc/attention/decode.h``.
This module adds the fake kernel, a CUDA body, and the checks of the public function.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from .. import _C  # noqa: F401  (registers the schema and the CPU kernel)
from ..errors import ArgumentError, ArgumentTypeError
from ..reference.attention import kvcache_attention as _reference_kvcache
from ._common import script_unsupported
from .attention import MAX_HEAD_DIM, MAX_HEAD_DIM_CPU, _check_alibi, _check_softcap, _check_window

_op = torch.ops.seqkernels.flash_attention_kvcache.default  # the overload: no packet lookup per step
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FN = "flash_attention_with_kvcache"


@torch.library.register_fake("seqkernels::flash_attention_kvcache")
def _fake(q, k_cache, v_cache, k, v, cache_seqlens, block_table, causal, scale, softcap=0.0, window_left=-1,
          window_right=-1, alibi_slopes=None):
    B, H, Lq, _ = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(B, H, Lq, v_cache.shape[-1]), q.new_empty(B, H, Lq, dtype=lse_dtype)


def _cuda(q, k_cache, v_cache, k, v, cache_seqlens, block_table, causal, scale, softcap=0.0, window_left=-1,
          window_right=-1, alibi_slopes=None):
    from seqkernels.kernels import decode as kernels

    # the op body checks the values itself (the Python API leaves them to it off the CPU, and
    # a compiled graph skips the API's checks); the CPU op checks them in C++
    _check_values(k_cache, cache_seqlens, block_table, 0 if k is None else k.shape[2], "flash_attention_kvcache")
    return kernels.kvcache_attention(q, k_cache, v_cache, k, v, cache_seqlens, block_table, causal, scale, softcap,
                                     window_left, window_right, alibi_slopes)


torch.library.impl("seqkernels::flash_attention_kvcache", "CUDA", func=_cuda)


def _check(q, k_cache, v_cache, k, v, cache_seqlens, block_table) -> tuple[Tensor, Optional[Tensor]]:
    """The checks of every argument, values included, before anything is written.
    Returns cache_seqlens as a (B,) tensor and the block table.

    Written for a decode step's fixed cost (this runs once per generated token): each shape,
    dtype and device is read once, and the messages are only formatted on failure."""
    new = k is not None or v is not None
    named = (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)) + ((("k", k), ("v", v)) if new else ())
    if not isinstance(q, Tensor):
        raise ArgumentTypeError(f"{_FN}: q must be a torch.Tensor, got {type(q).__name__}")
    dt, dev = q.dtype, q.device
    for name, t in named:
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise ArgumentTypeError(f"{_FN}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ArgumentError(f"{_FN}: {name} must be 4-D, got shape {tuple(t.shape)}")
        if t.dtype != dt:
            raise ArgumentTypeError(f"{_FN}: {name} must have q's dtype {dt}, got {t.dtype}")
        if t.device != dev:
            raise ArgumentError(f"{_FN}: {name} must be on q's device {dev}, got {t.device}")
    if dt not in _DTYPES:
        raise ArgumentTypeError(f"{_FN}: q must be float16, bfloat16, float32 or float64, got {dt}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for _, t in named):
        raise ArgumentError(f"{_FN}: inference only (the caches are written in place and no gradient is "
                            "computed); call it under torch.no_grad() or with tensors that do not require grad")
    (B, H, Lq, D), ks, vs = q.shape, k_cache.shape, v_cache.shape
    Hk, Dv = ks[1], vs[3]
    if not k_cache.is_contiguous() or not v_cache.is_contiguous():
        name = "k_cache" if not k_cache.is_contiguous() else "v_cache"
        raise ArgumentError(f"{_FN}: {name} must be contiguous (it is written in place)")
    if ks[3] != D:
        raise ArgumentError(f"{_FN}: k_cache's head dim {ks[3]} must be q's {D}")
    if vs[:3] != ks[:3]:
        raise ArgumentError(f"{_FN}: k_cache {tuple(ks)} and v_cache {tuple(vs)} must agree but for the head dim")
    if Hk == 0 or H % Hk != 0:
        raise ArgumentError(f"{_FN}: the query heads ({H}) must be a multiple of the cache's kv heads ({Hk})")
    if D == 0 or Dv == 0:
        raise ArgumentError(f"{_FN}: head dims must be positive")
    cpu = q.is_cpu
    top = MAX_HEAD_DIM_CPU if cpu else MAX_HEAD_DIM
    if D > top or Dv > top:
        raise ArgumentError(f"{_FN}: head dims up to {top} on {dev.type} (the CPU kernels take up to "
                            f"{MAX_HEAD_DIM_CPU}, the GPU kernels {MAX_HEAD_DIM}), got {D} and {Dv}")
    if block_table is not None:
        if not isinstance(block_table, Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2 \
                or block_table.shape[0] != B:
            raise ArgumentTypeError(f"{_FN}: block_table must be an int32 tensor of shape (batch, max_blocks) = "
                                    f"({B}, max_blocks)")
        if block_table.device != dev:
            raise ArgumentError(f"{_FN}: block_table must be on {dev}")
        capacity = block_table.shape[1] * ks[2]
    else:
        if ks[0] != B:
            raise ArgumentError(f"{_FN}: k_cache's batch {ks[0]} must be q's {B} (pass block_table for a paged "
                                "cache)")
        capacity = ks[2]
    Lnew = 0
    if new:
        if k is None or v is None:
            raise ArgumentError(f"{_FN}: k and v must be given together")
        kn, vn = k.shape, v.shape
        if kn[0] != B or kn[1] != Hk or kn[3] != D:
            raise ArgumentError(f"{_FN}: k must be (batch, kv_heads, Lnew, head_dim) = ({B}, {Hk}, Lnew, {D}), "
                                f"got {tuple(kn)}")
        Lnew = kn[2]
        if vn != (B, Hk, Lnew, Dv):
            raise ArgumentError(f"{_FN}: v must be {(B, Hk, Lnew, Dv)}, got {tuple(vn)}")
    if cache_seqlens is None:
        if Lnew:
            raise ArgumentError(f"{_FN}: cache_seqlens is needed to append k and v")
        cache_seqlens = capacity
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=dev)
    elif not isinstance(cache_seqlens, Tensor) or cache_seqlens.dtype not in (torch.int32, torch.int64) \
            or cache_seqlens.shape != (B,):
        raise ArgumentTypeError(f"{_FN}: cache_seqlens must be an int or an int32/int64 tensor of shape ({B},)")
    elif cache_seqlens.device != dev:
        raise ArgumentError(f"{_FN}: cache_seqlens must be on {dev}")
    # the values: here on the CPU (the C++ op checks them again, for direct calls); a GPU op
    # body checks them itself, and so does every op body under torch.compile
    if cpu and not torch.compiler.is_compiling():
        _check_values(k_cache, cache_seqlens, block_table, Lnew, _FN)
    return cache_seqlens, block_table


def _check_values(k_cache, cache_seqlens, block_table, Lnew: int, fn: str) -> None:
    """Every write inside the cache, every block id used inside the pool (before a write).
    On the CPU the lengths are read as one list (a decode step's batch is small, and a list
    is cheaper than a reduction op and two reads of its result)."""
    if cache_seqlens.numel() == 0:
        return
    rows = k_cache.shape[2]
    capacity = block_table.shape[1] * rows if block_table is not None else rows
    if cache_seqlens.is_cpu:
        lens = cache_seqlens.tolist()
        lo, hi = min(lens), max(lens)
    else:
        lo, hi = (int(x) for x in torch.aminmax(cache_seqlens))
    if lo < 0 or hi + Lnew > capacity:
        raise ArgumentError(f"{fn}: cache_seqlens + Lnew must lie in [0, {capacity}] (the cache's positions), "
                            f"got cache_seqlens in [{lo}, {hi}] with Lnew = {Lnew}")
    if block_table is not None:
        blocks_needed = (cache_seqlens.to(torch.int64) + Lnew + rows - 1) // rows
        used = torch.arange(block_table.shape[1], device=block_table.device) < blocks_needed[:, None]
        ids = block_table[used]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= k_cache.shape[0]):
            raise ArgumentError(f"{fn}: block_table holds ids outside the pool of {k_cache.shape[0]} blocks")


def flash_attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    cache_seqlens: Union[Tensor, int, None] = None,
    block_table: Optional[Tensor] = None,
    causal: bool = True,
    scale: Optional[float] = None,
    return_lse: bool = False,
    *,
    softcap: float = 0.0,
    window: tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
):
    """One decoding step against a KV cache, flash-attn's ``flash_attn_with_kvcache`` in this
    library's (batch, heads, seq, head_dim) layout.

    The new keys and values ``k``, ``v`` (batch, kv_heads, Lnew, head_dim), if given, are
    written into the caches **in place** at positions ``cache_seqlens[b]`` ..
    ``cache_seqlens[b] + Lnew - 1``; then ``q`` (batch, heads, Lq, head_dim) attends to the
    first ``cache_seqlens[b] + Lnew`` keys of its sequence, causal bottom-right on that
    length (query i sees key j <= i + cache_seqlens[b] + Lnew - Lq) unless ``causal=False``.
    heads must be a multiple of kv_heads (grouped-query attention without repeating K/V).

    Args:
        k_cache, v_cache: (batch, kv_heads, max_len, head_dim[_v]), contiguous; or, with
            ``block_table``, pools (num_blocks, kv_heads, block_size, head_dim[_v]) where
            position p of sequence b lives in block ``block_table[b, p // block_size]``
            (vLLM's layout; any block size from 1 up).
        cache_seqlens: int32/int64 (batch,) tensor or an int: the keys already cached per
            sequence (None: the whole cache, only without k/v). Pass a tensor under
            ``torch.compile`` so that steps do not recompile.
        block_table: (batch, max_blocks) int32.
        scale: softmax scale, default 1/sqrt(head_dim).
        return_lse: also return the log-sum-exp of each row (fp32; fp64 for fp64 inputs).
        softcap: logit softcapping, as in :func:`seqkernels.flash_attention`.
        window: a sliding window (left, right), flash-attn's window_size, aligned like the
            causal mask on each sequence's own length (query i sits at position
            i + cache_seqlens[b] + Lnew - Lq). Keys before every row's window are never read.
        alibi_slopes: ALiBi slopes, float32 (heads,) or (batch, heads), as in
            :func:`seqkernels.flash_attention`, positions aligned as the window.

    Caches in float32, bfloat16 or float16 (and float64); half-precision caches are read as
    such and accumulated in float32. Inference only: raises if any input requires grad.
    Every argument and value is checked before anything is written, so a call that raises
    leaves the caches unchanged.

    Returns:
        out (batch, heads, Lq, head_dim_v), or (out, lse).
    """
    cache_seqlens, block_table = _check(q, k_cache, v_cache, k, v, cache_seqlens, block_table)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    softcap, window = _check_softcap(softcap, _FN), _check_window(window, _FN)
    alibi_slopes = _check_alibi(alibi_slopes, q.shape[0], q.shape[1], q.device, _FN)
    out, lse = _op(q, k_cache, v_cache, k, v, cache_seqlens, block_table, bool(causal), scale, softcap, *window,
                   alibi_slopes)
    return (out, lse) if return_lse else out


script_unsupported(flash_attention_with_kvcache, "seqkernels.flash_attention_with_kvcache")
