"""The attention ops: ``seqkernels::flash_attention_forward`` / ``_backward``.

Schemas are declared in ``csrc/seqkernels.cpp``; the CPU body is the C++ kernel in
``csrc/attention/flash_attention_cpu.cpp``. This module adds the fake (meta) kernels,
autograd, a CUDA body, and the public :func:`flash_attention` with its argument checks.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _C  # noqa: F401  (registers the schemas and the CPU kernels)
from ..reference.attention import flash_attention as _reference_flash_attention

_fwd = torch.ops.seqkernels.flash_attention_forward
_bwd = torch.ops.seqkernels.flash_attention_backward

MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics are fp32, or fp64 for fp64 inputs (so gradcheck stays exact)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- fake kernels: shapes and dtypes only, for torch.compile and meta tensors ---------------

@torch.library.register_fake("seqkernels::flash_attention_forward")
def _fwd_fake(q, k, v, causal, bottom_right, scale):
    B, H, Lq, _ = q.shape
    out = q.new_empty(B, H, Lq, v.shape[-1])
    lse = q.new_empty(B, H, Lq, dtype=_lse_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("seqkernels::flash_attention_backward")
def _bwd_fake(grad_out, grad_lse, q, k, v, out, lse, causal, bottom_right, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# --- autograd --------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    q, k, v, causal, bottom_right, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.bottom_right, ctx.scale = causal, bottom_right, scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _bwd(grad_out, grad_lse, q, k, v, out, lse, ctx.causal, ctx.bottom_right, ctx.scale)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("seqkernels::flash_attention_forward", _backward, setup_context=_setup_context)


# --- CUDA body -------------------------------------------------------------------------------
# The Triton kernels (kernels/flash_attention.py) for float16 and bfloat16. float32 and
# float64 on CUDA run the materialized reference math in their dtype (O(Lq * Lk) memory):
# no float32 Triton config compiles without register spills for every head dim yet (see
# kernels/aot.py), and float64 on a GPU is for gradcheck, not for speed.

_TRITON_DTYPES = (torch.float16, torch.bfloat16)

def _triton():
    from seqkernels.kernels import flash_attention as kernels

    return kernels


@torch.library.impl("seqkernels::flash_attention_forward", "CUDA")
def _fwd_cuda(q, k, v, causal, bottom_right, scale):
    if q.dtype in _TRITON_DTYPES:
        return _triton().forward(q, k, v, causal, bottom_right, scale)
    out, lse = _reference_flash_attention(q, k, v, causal=causal, scale=scale, bottom_right=bottom_right)
    return out, lse.to(_lse_dtype(q.dtype))


@torch.library.impl("seqkernels::flash_attention_backward", "CUDA")
def _bwd_cuda(grad_out, grad_lse, q, k, v, out, lse, causal, bottom_right, scale):
    if q.dtype in _TRITON_DTYPES:
        return _triton().backward(grad_out, grad_lse, q, k, v, out, lse, causal, bottom_right, scale)
    with torch.enable_grad():
        qw, kw, vw = (t.detach().requires_grad_() for t in (q, k, v))
        o, l = _reference_flash_attention(qw, kw, vw, causal=causal, scale=scale, bottom_right=bottom_right)
        finite = torch.isfinite(l)
        outs, grads = [o], [grad_out]
        if grad_lse is not None:
            outs.append(torch.where(finite, l, torch.zeros_like(l)))
            grads.append(grad_lse.to(l.dtype))
        return torch.autograd.grad(outs, (qw, kw, vw), grads)


# --- argument checks -------------------------------------------------------------------------

def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor, fn: str = "flash_attention") -> None:
    """Raise a ValueError/TypeError naming the argument for anything the kernels do not take."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{fn}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{fn}: q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{fn}: q, k and v must be on the same device, got {q.device}, {k.device}, {v.device}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"{fn}: batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"{fn}: k and v must have the same number of heads, got {k.shape[1]} and {v.shape[1]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{fn}: the query heads ({q.shape[1]}) must be a multiple of the key/value heads ({k.shape[1]})")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"{fn}: k and v must have the same length, got {k.shape[2]} and {v.shape[2]}")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"{fn}: sequence lengths must be at least 1, got q {q.shape[2]} and k {k.shape[2]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"{fn}: q and k head dims differ: {q.shape[3]} and {k.shape[3]}")
    for name, dim in (("q/k", q.shape[3]), ("v", v.shape[3])):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"{fn}: the {name} head dim must be between 1 and {MAX_HEAD_DIM}, got {dim}")


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Exact attention softmax(q k^T * scale) v, computed tile by tile in O(n) memory.

    Args:
        q: (batch, heads, Lq, head_dim).
        k: (batch, kv_heads, Lk, head_dim); kv_heads divides heads (grouped-query / multi-query
            attention: query head h uses key/value head h // (heads // kv_heads)).
        v: (batch, kv_heads, Lk, head_dim_v).
        causal: mask aligned **bottom-right** (FlashAttention's convention, as decoding
            needs): query i sees keys j <= i + Lk - Lq, so the last query sees every key. For
            torch's top-left ``is_causal`` use :func:`seqkernels.scaled_dot_product_attention`.
            The two agree when Lq == Lk. A query that sees no key gets a zero output.
        scale: softmax scale, default 1/sqrt(head_dim).
        return_lse: also return the log-sum-exp of each row of scaled scores, (batch, heads,
            Lq) in float32 (float64 for float64 inputs), -inf for a row that sees no key.

    Returns:
        out (batch, heads, Lq, head_dim_v), or (out, lse). Differentiable in q, k, v (and
        through lse).

    Head dims up to 256; float16, bfloat16, float32 and float64. On the CPU, float16 and
    bfloat16 inputs are computed in float32 (the C++ kernel takes float32 and float64).

    Example::

        >>> q = torch.randn(2, 8, 128, 64); k = v = torch.randn(2, 2, 128, 64)
        >>> out = seqkernels.flash_attention(q, k, v, causal=True)   # (2, 8, 128, 64)
    """
    check_attention_inputs(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    dtype = q.dtype
    if q.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    out, lse = _fwd(q, k, v, bool(causal), True, scale)
    out = out.to(dtype)
    return (out, lse) if return_lse else out
