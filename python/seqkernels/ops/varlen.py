"""Packed variable-length batches: ``seqkernels::flash_attention_varlen_forward`` /
``_backward`` and :func:`flash_attention_varlen` (flash-attn's ``flash_attn_varlen_func``).

Schemas in ``csrc/seqkernels.cpp``; the CPU body is the flash kernel of
``csrc/attention/flash_attention_cpu.cpp`` reading the packed rows in place, its work split
at sequence boundaries. This module adds the fake kernels, autograd, a CUDA body and the
public function with its argument checks.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function

from .. import _C  # noqa: F401  (registers the schemas and the CPU kernels)
from ..errors import ArgumentError, ArgumentTypeError
from ..reference.attention import varlen_attention as _reference_varlen
from ..reference.philox import dropout_keep_mask
from ._common import forbid_double_backward, functorch_wrapped, script_unsupported
from .attention import (_check_alibi, _check_softcap, _check_window, _dropout_args, _is_symbolic, _lse_dtype,
                        _new_rng_state, call_forward, check_attention_inputs)

_fwd = torch.ops.seqkernels.flash_attention_varlen_forward
_bwd = torch.ops.seqkernels.flash_attention_varlen_backward
_FN = "flash_attention_varlen"


@torch.library.register_fake("seqkernels::flash_attention_varlen_forward")
def _fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, dropout_p=0.0,
              rng_state=None, softcap=0.0, window_left=-1, window_right=-1, alibi_slopes=None):
    T, H, _ = q.shape
    return q.new_empty(T, H, v.shape[-1]), q.new_empty(H, T, dtype=_lse_dtype(q.dtype))


@torch.library.register_fake("seqkernels::flash_attention_varlen_backward")
def _bwd_fake(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
              scale, dropout_p=0.0, rng_state=None, softcap=0.0, window_left=-1, window_right=-1, alibi_slopes=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, rng_state, softcap, wl, wr, alibi = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, rng_state, alibi)
    ctx.options = (max_q, max_k, causal, scale, dropout_p)
    ctx.tail = (softcap, wl, wr)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_q, cu_k, rng_state, alibi = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _bwd(grad_out, grad_lse, q, k, v, out, lse, cu_q, cu_k, *ctx.options, rng_state, *ctx.tail, alibi)
    return (dq, dk, dv) + (None,) * 12


torch.library.register_autograd("seqkernels::flash_attention_varlen_forward", _backward,
                                setup_context=_setup_context)
forbid_double_backward("seqkernels::flash_attention_varlen_backward")


# --- the CUDA body: the Triton flash kernels with VARLEN (kernels/flash_attention.py); float64
# and torch.func transforms run the exact math one sequence at a time ----------------------

def _materialized(q, k, v, cu_q, cu_k, max_k, causal, scale, dropout_p, rng_state, softcap, wl, wr, alibi):
    keep = None
    if dropout_p > 0.0:  # the kernels' counters: a (1, H, total_q, max_seqlen_k) batch
        seed, offset = (int(x) for x in rng_state.tolist())
        keep = dropout_keep_mask((1, q.shape[1], q.shape[0], max(int(max_k), 1)), dropout_p, seed, offset,
                                 device=q.device)
    out, lse = _reference_varlen(q, k, v, cu_q, cu_k, causal, scale, softcap=softcap, window=(wl, wr),
                                 alibi_slopes=alibi, dropout_p=dropout_p, dropout_mask=keep)
    return out, lse.to(_lse_dtype(q.dtype))


def _check_values_eager(q, k, cu_q, cu_k, max_q, max_k, fn):
    """What the CPU op checks in C++, for the CUDA body (which reads cu_seqlens anyway)."""
    for name, cu, rows, top in (("cu_seqlens_q", cu_q, q.shape[0], max_q), ("cu_seqlens_k", cu_k, k.shape[0], max_k)):
        _check_cu_values(cu, rows, top, name, fn)


def _triton_kernels(q):
    """The Triton kernels for float16 / bfloat16 / float32 (float64, for gradcheck, runs the
    exact math)."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return None
    from seqkernels.kernels import flash_attention as kernels

    return kernels


def _fwd_cuda(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p=0.0, rng_state=None, softcap=0.0, wl=-1,
              wr=-1, alibi_slopes=None):
    _check_values_eager(q, k, cu_q, cu_k, max_q, max_k, "flash_attention_varlen_forward")
    kernels = _triton_kernels(q)
    if kernels is not None:
        return kernels.forward_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, rng_state,
                                      softcap, wl, wr, alibi_slopes)
    return _materialized(q, k, v, cu_q, cu_k, max_k, causal, scale, dropout_p, rng_state, softcap, wl, wr,
                         alibi_slopes)


def _bwd_cuda(grad_out, grad_lse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p=0.0,
              rng_state=None, softcap=0.0, wl=-1, wr=-1, alibi_slopes=None):
    _check_values_eager(q, k, cu_q, cu_k, max_q, max_k, "flash_attention_varlen_backward")
    kernels = _triton_kernels(q)
    if kernels is not None:
        return kernels.backward_varlen(grad_out, grad_lse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale,
                                       dropout_p, rng_state, softcap, wl, wr, alibi_slopes)
    with torch.enable_grad():
        qw, kw, vw = (t.detach().requires_grad_() for t in (q, k, v))
        o, l = _materialized(qw, kw, vw, cu_q, cu_k, max_k, causal, scale, dropout_p, rng_state, softcap, wl, wr,
                             alibi_slopes)
        outs, grads = [o], [grad_out]
        if grad_lse is not None:
            outs.append(torch.where(torch.isfinite(l), l, torch.zeros_like(l)))
            grads.append(grad_lse.to(l.dtype))
        return tuple(g.contiguous() for g in torch.autograd.grad(outs, (qw, kw, vw), grads, allow_unused=True))


torch.library.impl("seqkernels::flash_attention_varlen_forward", "CUDA", func=_fwd_cuda)
torch.library.impl("seqkernels::flash_attention_varlen_backward", "CUDA", func=_bwd_cuda)


# --- argument checks ---------------------------------------------------------------------

def _check_cu_values(cu: Tensor, rows: int, top: int, name: str, fn: str) -> None:
    """cu[0] = 0, non-decreasing, cu[-1] = rows, no sequence longer than top."""
    lengths = cu[1:] - cu[:-1]
    lo, hi = torch.aminmax(lengths) if lengths.numel() else (cu[0] * 0, cu[0] * 0)
    first, last, lo, hi = torch.stack([cu[0], cu[-1], lo, hi]).tolist()  # one read of the values
    if first != 0:
        raise ArgumentError(f"{fn}: {name}[0] must be 0, got {first}")
    if lo < 0:
        raise ArgumentError(f"{fn}: {name} must be non-decreasing")
    if last != rows:
        raise ArgumentError(f"{fn}: {name}[-1] = {last} must be the number of rows given, {rows}")
    if hi > top:
        raise ArgumentError(f"{fn}: a sequence of {hi} rows in {name} is longer than max_seqlen {top}")


def _check_varlen_args(q, k, cu_q, cu_k, max_q, max_k) -> None:
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(cu, Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] < 1:
            raise ArgumentTypeError(f"{_FN}: {name} must be an int32 tensor of shape (batch + 1,) "
                                    f"(flash-attn's layout), got "
                                    f"{cu.dtype if isinstance(cu, Tensor) else type(cu).__name__}"
                                    f"{' of shape ' + str(tuple(cu.shape)) if isinstance(cu, Tensor) else ''}")
        if cu.device != q.device:
            raise ArgumentError(f"{_FN}: {name} must be on {q.device}, got {cu.device}")
    if cu_q.shape[0] != cu_k.shape[0]:
        raise ArgumentError(f"{_FN}: cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got "
                            f"{cu_q.shape[0]} and {cu_k.shape[0]}")
    for name, m in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        if isinstance(m, bool) or not isinstance(m, (int, torch.SymInt)):
            raise ArgumentTypeError(f"{_FN}: {name} must be an int (a Python int keeps .item() out of compiled "
                                    f"graphs), got {type(m).__name__}")
        if isinstance(m, int) and m < 0:
            raise ArgumentError(f"{_FN}: {name} must be >= 0, got {m}")
    if q.device.type == "cpu" and not (_is_symbolic(cu_q) or _is_symbolic(cu_k)):
        # off the CPU and in traced calls the op body checks the values when it runs (the CPU
        # op in C++ too), so a GPU call reads cu_seqlens once
        _check_values_eager(q, k, cu_q, cu_k, max_q, max_k, _FN)


def flash_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = False,
    scale: Optional[float] = None,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
):
    """Attention over a packed batch of sequences of different lengths, flash-attn's
    ``flash_attn_varlen_func``: no padding is stored or computed.

    Args:
        q: (total_q, heads, head_dim), the queries of every sequence one after another.
        k: (total_k, kv_heads, head_dim); kv_heads divides heads (grouped-query attention).
        v: (total_k, kv_heads, head_dim_v).
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,): sequence b is rows
            ``cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1`` of q and ``cu_seqlens_k[b] ..
            cu_seqlens_k[b + 1] - 1`` of k and v (cumulative lengths from 0; a sequence may be
            empty).
        max_seqlen_q, max_seqlen_k: Python ints, at least the longest sequence's length
            (checked). Ints, not tensors, so that a compiled graph reads no value
            (no ``.item()``) and different batches do not recompile it.
        causal: bottom-right on each sequence's own lengths (query i sees keys
            j <= i + Lk_b - Lq_b), as in flash-attn.
        scale: softmax scale, default 1/sqrt(head_dim).
        window, softcap, alibi_slopes, dropout_p: as in :func:`seqkernels.flash_attention`,
            on each sequence's own positions (``alibi_slopes`` (heads,) or (batch, heads)).
            The dropout counters are those of a (1, heads, total_q, max_seqlen_k) batch.
        return_lse: also return the log-sum-exp of each row, (heads, total_q) in float32
            (float64 for float64 inputs), flash-attn's layout; -inf for a row without keys.

    Returns:
        out (total_q, heads, head_dim_v), or (out, lse). Differentiable in q, k, v.

    The flash kernels (C++ on the CPU, Triton on a GPU) read the packed rows in place and
    split their work at sequence boundaries: no tile spans two sequences.

    Example::

        >>> lens = torch.tensor([5, 300, 17]); cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).int()
        >>> q = torch.randn(322, 8, 64); k = v = torch.randn(322, 2, 64)
        >>> out = seqkernels.flash_attention_varlen(q, k, v, cu, cu, 300, 300, causal=True)  # (322, 8, 64)
    """
    tensors = tuple(t for t in (q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes) if isinstance(t, Tensor))
    if has_torch_function(tensors):
        return handle_torch_function(flash_attention_varlen, tensors, q, k, v, cu_seqlens_q, cu_seqlens_k,
                                     max_seqlen_q, max_seqlen_k, causal, scale, window, softcap, alibi_slopes,
                                     dropout_p, return_lse)
    check_attention_inputs(q, k, v, _FN, packed=True)
    _check_varlen_args(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ArgumentError(f"{_FN}: dropout_p must be a float in [0, 1], got {dropout_p!r}")
    softcap = _check_softcap(softcap, _FN)
    wl, wr = _check_window(window, _FN)
    alibi_slopes = _check_alibi(alibi_slopes, cu_seqlens_q.shape[0] - 1, q.shape[1], q.device, _FN)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    dtype = q.dtype
    if functorch_wrapped(q, k, v):  # torch.func transforms: the same math, materialized
        p, rng_state, drop_all = _dropout_args(dropout_p)
        out, lse = _materialized(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, bool(causal), scale, p, rng_state,
                                 softcap, wl, wr, alibi_slopes)
    else:
        if q.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
        p, rng_state, drop_all = _dropout_args(dropout_p)
        args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bool(causal), scale, p, rng_state,
                softcap, wl, wr, alibi_slopes)
        out, lse = call_forward(_fwd, args, q, k, v)
    if drop_all:  # every probability dropped: zeros (and zero gradients), as torch's dropout
        out = out * 0
    out = out if out.dtype == dtype else out.to(dtype)
    return (out, lse) if return_lse else out


script_unsupported(flash_attention_varlen, "seqkernels.flash_attention_varlen")
