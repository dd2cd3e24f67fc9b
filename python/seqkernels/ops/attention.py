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

from torch.overrides import handle_torch_function, has_torch_function

from .. import _C  # noqa: F401  (registers the schemas and the CPU kernels)
from ..errors import ArgumentError, ArgumentTypeError
from ._common import forbid_double_backward, functorch_wrapped, script_unsupported
from ..reference.attention import flash_attention as _reference_flash_attention
from ..reference.philox import dropout_keep_mask

_fwd = torch.ops.seqkernels.flash_attention_forward
_bwd = torch.ops.seqkernels.flash_attention_backward

# The largest head dim: on a GPU the Triton kernels' largest head-dim class (their tiles
# fit shared memory up to it; tests/kernels/test_aot_compile.py), and the SDPA drop-in's
# everywhere; the CPU kernels take up to MAX_HEAD_DIM_CPU (MLA's 576 / 512 included).
MAX_HEAD_DIM = 256
MAX_HEAD_DIM_CPU = 1024
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_causal_bias(t) -> bool:
    """Whether t is torch's CausalBias (a tensor subclass with no values of its own)."""
    if t is None or type(t) is Tensor:
        return False
    from torch.nn.attention.bias import CausalBias

    return isinstance(t, CausalBias)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics are fp32, or fp64 for fp64 inputs (so gradcheck stays exact)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- fake kernels: shapes and dtypes only, for torch.compile and meta tensors ---------------

@torch.library.register_fake("seqkernels::flash_attention_forward")
def _fwd_fake(q, k, v, causal, bottom_right, scale, attn_mask=None, key_lengths=None, dropout_p=0.0,
              rng_state=None, softcap=0.0, window_left=-1, window_right=-1, alibi_slopes=None):
    B, H, Lq, _ = q.shape
    out = q.new_empty(B, H, Lq, v.shape[-1])
    lse = q.new_empty(B, H, Lq, dtype=_lse_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("seqkernels::flash_attention_backward")
def _bwd_fake(grad_out, grad_lse, q, k, v, out, lse, causal, bottom_right, scale, attn_mask=None,
              key_lengths=None, dropout_p=0.0, rng_state=None, softcap=0.0, window_left=-1, window_right=-1,
              alibi_slopes=None):
    # the kernels return contiguous gradients whatever the inputs' strides
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# --- autograd --------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    q, k, v, causal, bottom_right, scale, attn_mask, key_lengths, dropout_p, rng_state, softcap, wl, wr, alibi = inputs
    if attn_mask is not None and attn_mask.requires_grad:
        raise RuntimeError(
            "seqkernels::flash_attention_forward: the fused kernels do not compute a gradient for "
            "attn_mask; seqkernels.scaled_dot_product_attention computes it (materialized) instead")
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, key_lengths, rng_state, alibi)
    ctx.causal, ctx.bottom_right, ctx.scale, ctx.dropout_p, ctx.softcap = causal, bottom_right, scale, dropout_p, softcap
    ctx.window = (wl, wr)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, attn_mask, key_lengths, rng_state, alibi = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _bwd(grad_out, grad_lse, q, k, v, out, lse, ctx.causal, ctx.bottom_right, ctx.scale,
                      attn_mask, key_lengths, ctx.dropout_p, rng_state, ctx.softcap, *ctx.window, alibi)
    return (dq, dk, dv) + (None,) * 11


torch.library.register_autograd("seqkernels::flash_attention_forward", _backward, setup_context=_setup_context)
forbid_double_backward("seqkernels::flash_attention_backward")


# --- CUDA body -------------------------------------------------------------------------------
# The Triton kernels (kernels/flash_attention.py) for float16, bfloat16 and float32, masks,
# key lengths, dropout, softcap, windows and ALiBi included. float64 on CUDA (for gradcheck, not speed) runs the
# materialized math below in float64, with the same Philox dropout mask.

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton():
    from seqkernels.kernels import flash_attention as kernels

    return kernels


def _use_triton(q) -> bool:
    return q.dtype in _TRITON_DTYPES


def _keep_mask(q, k, dropout_p, rng_state) -> Optional[Tensor]:
    if dropout_p == 0.0:
        return None
    seed, offset = (int(x) for x in rng_state.tolist())
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return dropout_keep_mask(shape, dropout_p, seed, offset, device=q.device)


def _materialized(q, k, v, causal, bottom_right, scale, attn_mask, key_lengths, dropout_p, rng_state,
                  softcap=0.0, window_left=-1, window_right=-1, alibi_slopes=None):
    out, lse = _reference_flash_attention(
        q, k, v, causal=causal, scale=scale, bottom_right=bottom_right, attn_mask=attn_mask,
        key_lengths=key_lengths, dropout_p=dropout_p, dropout_mask=_keep_mask(q, k, dropout_p, rng_state),
        softcap=softcap, window=(window_left, window_right), alibi_slopes=alibi_slopes)
    return out, lse.to(_lse_dtype(q.dtype))


@torch.library.impl("seqkernels::flash_attention_forward", "CUDA")
def _fwd_cuda(q, k, v, causal, bottom_right, scale, attn_mask=None, key_lengths=None, dropout_p=0.0,
              rng_state=None, softcap=0.0, window_left=-1, window_right=-1, alibi_slopes=None):
    check_key_lengths_range(key_lengths, k.shape[2], "flash_attention_forward")
    if _use_triton(q):
        return _triton().forward(q, k, v, causal, bottom_right, scale, attn_mask, key_lengths, dropout_p, rng_state,
                                 softcap, window_left, window_right, alibi_slopes)
    return _materialized(q, k, v, causal, bottom_right, scale, attn_mask, key_lengths, dropout_p, rng_state,
                         softcap, window_left, window_right, alibi_slopes)


@torch.library.impl("seqkernels::flash_attention_backward", "CUDA")
def _bwd_cuda(grad_out, grad_lse, q, k, v, out, lse, causal, bottom_right, scale, attn_mask=None,
              key_lengths=None, dropout_p=0.0, rng_state=None, softcap=0.0, window_left=-1, window_right=-1,
              alibi_slopes=None):
    check_key_lengths_range(key_lengths, k.shape[2], "flash_attention_backward")
    if _use_triton(q):
        return _triton().backward(grad_out, grad_lse, q, k, v, out, lse, causal, bottom_right, scale, attn_mask,
                                  key_lengths, dropout_p, rng_state, softcap, window_left, window_right, alibi_slopes)
    with torch.enable_grad():
        qw, kw, vw = (t.detach().requires_grad_() for t in (q, k, v))
        o, l = _materialized(qw, kw, vw, causal, bottom_right, scale, attn_mask, key_lengths, dropout_p,
                             rng_state, softcap, window_left, window_right, alibi_slopes)
        finite = torch.isfinite(l)
        outs, grads = [o], [grad_out]
        if grad_lse is not None:
            outs.append(torch.where(finite, l, torch.zeros_like(l)))
            grads.append(grad_lse.to(l.dtype))
        return tuple(g.contiguous() for g in torch.autograd.grad(outs, (qw, kw, vw), grads))


# --- argument checks -------------------------------------------------------------------------

def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor, fn: str = "flash_attention", packed: bool = False) -> None:
    """Raise a ValueError/TypeError naming the argument for anything the kernels do not take:
    (batch, heads, seq, head_dim) tensors, or with ``packed`` the varlen layout (total,
    heads, head_dim), where empty batches are allowed.

    Written for a decode step's fixed cost: the shapes are read once, and the messages are
    only formatted on failure."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ArgumentTypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    qs, ks, vs = q.shape, k.shape, v.shape
    rank = 3 if packed else 4
    if len(qs) != rank or len(ks) != rank or len(vs) != rank:
        name, t = next((n, t) for n, t in (("q", qs), ("k", ks), ("v", vs)) if len(t) != rank)
        layout = "(total, heads, head_dim)" if packed else "(batch, heads, seq, head_dim)"
        raise ArgumentError(f"{fn}: {name} must be {rank}-D {layout}, got shape {tuple(t)}")
    dt = q.dtype
    if dt not in _DTYPES or k.dtype != dt or v.dtype != dt:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dtype not in _DTYPES:
                raise ArgumentTypeError(f"{fn}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        raise ArgumentTypeError(f"{fn}: q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ArgumentError(f"{fn}: q, k and v must be on the same device, got {q.device}, {k.device}, {v.device}")
    if packed:
        (_, H, D), (Lk, Hk, Dk), (Lv, Hv, Dv) = qs, ks, vs
        if Lk != Lv:
            raise ArgumentError(f"{fn}: k and v must have the same number of rows, got {Lk} and {Lv}")
    else:
        (B, H, Lq, D), (Bk, Hk, Lk, Dk), (Bv, Hv, Lv, Dv) = qs, ks, vs
        if not (B == Bk == Bv):
            raise ArgumentError(f"{fn}: batch sizes differ: q {B}, k {Bk}, v {Bv}")
    if Hk != Hv:
        raise ArgumentError(f"{fn}: k and v must have the same number of heads, got {Hk} and {Hv}")
    if Hk == 0 or H % Hk != 0 or H == 0:
        raise ArgumentError(f"{fn}: the query heads ({H}) must be a multiple of the key/value heads ({Hk})")
    if not packed:
        if Lk != Lv:
            raise ArgumentError(f"{fn}: k and v must have the same length, got {Lk} and {Lv}")
        if Lq == 0 or Lk == 0:
            raise ArgumentError(f"{fn}: sequence lengths must be at least 1, got q {Lq} and k {Lk}")
    if D != Dk:
        raise ArgumentError(f"{fn}: q and k head dims differ: {D} and {Dk}")
    top = MAX_HEAD_DIM_CPU if q.device.type == "cpu" else MAX_HEAD_DIM
    if not (1 <= D <= top and 1 <= Dv <= top):
        name, dim = ("q/k", D) if not 1 <= D <= top else ("v", Dv)
        where = "the CPU kernels" if top == MAX_HEAD_DIM_CPU else (
            f"{q.device.type} (the GPU kernels' tiles fit shared memory up to {MAX_HEAD_DIM}; the CPU kernels "
            f"take up to {MAX_HEAD_DIM_CPU})")
        raise ArgumentError(f"{fn}: the {name} head dim must be between 1 and {top} on {where}, got {dim}")


def _check_mask_args(q: Tensor, k: Tensor, attn_mask, key_lengths, dropout_p, fn: str) -> None:
    """Checks of the optional arguments, on the 4-D (B, H, Lq, Lk) problem."""
    B, H, Lq, Lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise ArgumentTypeError(f"{fn}: attn_mask must be a torch.Tensor, got {type(attn_mask).__name__}")
        if is_causal_bias(attn_mask):
            raise ArgumentTypeError(f"{fn}: attn_mask is a torch.nn.attention.bias.CausalBias, which holds no "
                                    "values: pass causal=True (bottom-right) here, or use "
                                    "seqkernels.scaled_dot_product_attention, which takes CausalBias masks")
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            raise ArgumentTypeError(f"{fn}: attn_mask must be bool or floating point, got {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise ArgumentError(f"{fn}: attn_mask must be on {q.device}, got {attn_mask.device}")
        if attn_mask.dim() > 4 or any(
            a not in (1, f) for a, f in zip(reversed(attn_mask.shape), (Lk, Lq, H, B))
        ):
            raise ArgumentError(f"{fn}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"(batch, heads, Lq, Lk) = {(B, H, Lq, Lk)}")
    if key_lengths is not None:
        if not isinstance(key_lengths, Tensor) or key_lengths.dtype not in (torch.int32, torch.int64):
            raise ArgumentTypeError(f"{fn}: key_lengths must be an int32 or int64 tensor")
        if key_lengths.shape != (B,):
            raise ArgumentError(f"{fn}: key_lengths must have shape (batch,) = ({B},), got {tuple(key_lengths.shape)}")
        if key_lengths.device != q.device:
            raise ArgumentError(f"{fn}: key_lengths must be on {q.device}, got {key_lengths.device}")
        if not _is_symbolic(key_lengths):  # traced calls: the op checks the values when it runs
            check_key_lengths_range(key_lengths, Lk, fn)
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ArgumentError(f"{fn}: dropout_p must be a float in [0, 1], got {dropout_p!r}")


def _check_softcap(softcap, fn: str) -> float:
    """A finite number >= 0 (0 = off)."""
    if not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap < 0:
        raise ArgumentError(f"{fn}: softcap must be a finite number >= 0 (0 = off), got {softcap!r}")
    return float(softcap)


def _check_window(window, fn: str) -> tuple[int, int]:
    """(left, right) with each an int >= -1 (-1 = unbounded), flash-attn's window_size."""
    ok = isinstance(window, (tuple, list)) and len(window) == 2 and all(
        isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window)
    if not ok:
        raise ArgumentError(f"{fn}: window must be a pair of ints (left, right), each >= -1 (-1 = unbounded), "
                            f"got {window!r}")
    return int(window[0]), int(window[1])


def _check_alibi(alibi_slopes, B: int, H: int, device, fn: str) -> Optional[Tensor]:
    """None, or a float32 tensor of shape (H,) or (B, H) on the inputs' device (flash-attn's)."""
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, Tensor):
        raise ArgumentTypeError(f"{fn}: alibi_slopes must be a torch.Tensor, got {type(alibi_slopes).__name__}")
    if alibi_slopes.dtype != torch.float32:
        raise ArgumentTypeError(f"{fn}: alibi_slopes must be float32 (flash-attn's convention), got "
                                f"{alibi_slopes.dtype}")
    if tuple(alibi_slopes.shape) not in ((H,), (B, H)):
        raise ArgumentError(f"{fn}: alibi_slopes must have shape (heads,) = ({H},) or (batch, heads) = ({B}, {H}), "
                            f"got {tuple(alibi_slopes.shape)}")
    if alibi_slopes.device != device:
        raise ArgumentError(f"{fn}: alibi_slopes must be on {device}, got {alibi_slopes.device}")
    if alibi_slopes.requires_grad:
        raise ArgumentError(f"{fn}: the kernels compute no gradient for alibi_slopes; pass it detached")
    return alibi_slopes


def _is_symbolic(t: Tensor) -> bool:
    """True for tensors without values to read: under torch.compile, fake or meta tensors."""
    return torch.compiler.is_compiling() or t.device.type == "meta" or isinstance(t, torch._subclasses.FakeTensor)


def check_key_lengths_range(key_lengths: Optional[Tensor], Lk: int, fn: str) -> None:
    """key_lengths values must lie in [0, Lk]. Run by the Python API before the op and by the
    op bodies themselves (the C++ kernel checks in C++), so that a compiled graph, which
    skips the Python check, still raises."""
    if key_lengths is None or key_lengths.numel() == 0:
        return
    lo, hi = (int(x) for x in torch.aminmax(key_lengths))
    if lo < 0 or hi > Lk:
        raise ArgumentError(f"{fn}: key_lengths must lie in [0, Lk] = [0, {Lk}], got values in [{lo}, {hi}]")


def _new_rng_state() -> Tensor:
    """[seed, offset] for the kernels' Philox dropout: a seed from torch's CPU generator
    (so torch.manual_seed makes a run reproducible), offset 0."""
    seed = torch.randint(0, 2**62, (2,), dtype=torch.int64)
    return seed * torch.tensor([1, 0], dtype=torch.int64)


def _dropout_args(dropout_p) -> tuple[float, Optional[Tensor], bool]:
    """(p for the op, its rng_state or None, whether every probability is dropped: p >= 1,
    which the ops do not take; the caller zeroes the output as torch does)."""
    drop_all = dropout_p >= 1.0
    p = 0.0 if drop_all else float(dropout_p)
    return p, (_new_rng_state() if p > 0.0 else None), drop_all


def call_forward(op, args, q, k, v):
    """op(*args), skipping the Python autograd layer when there is nothing to differentiate
    (inference, decoding): several microseconds of a decode step's fixed cost."""
    if not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    return op(*args)


def _attention(q, k, v, causal, bottom_right, scale, attn_mask, key_lengths, dropout_p, softcap=0.0,
               window=(-1, -1), alibi_slopes=None):
    """Run the op on checked 4-D inputs; returns (out in q's dtype, lse)."""
    dtype = q.dtype
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and attn_mask.dtype != dtype:
            attn_mask = attn_mask.to(dtype)
        while attn_mask.dim() < 4:
            attn_mask = attn_mask.unsqueeze(0)
    if key_lengths is not None:
        key_lengths = key_lengths.to(torch.int64)
    if q.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        # the CPU kernels take bf16 / fp16 q, k, v as they are (the decode kernel reads them in
        # place); an additive mask is added to fp32 scores, so it goes in fp32
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.float()
    p, rng_state, drop_all = _dropout_args(dropout_p)
    args = (q, k, v, bool(causal), bool(bottom_right), scale, attn_mask, key_lengths, p, rng_state, float(softcap),
            int(window[0]), int(window[1]), alibi_slopes)
    out, lse = call_forward(_fwd, args, q, k, v)
    if drop_all:  # every probability dropped: torch gives zeros (and zero gradients)
        out = out * 0
    return (out if out.dtype == dtype else out.to(dtype)), lse


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    scale: Optional[float] = None,
    return_lse: bool = False,
    *,
    attn_mask: Optional[Tensor] = None,
    key_lengths: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    softcap: float = 0.0,
    window: tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
):
    """Exact attention softmax(q k^T * scale + mask) v, computed tile by tile in O(n) memory.

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
        attn_mask: broadcastable to (batch, heads, Lq, Lk): boolean (True = takes part, as in
            torch) or floating point (added to the scaled scores; no gradient flows to it).
            Read through its strides, never expanded; on the CPU, tiles that a boolean mask
            hides entirely are skipped.
        key_lengths: (batch,) integer tensor: keys j >= key_lengths[b] are padding and cost
            nothing (whole key tiles past the length are skipped).
        dropout_p: dropout on the probabilities (the LSE is before dropout). The mask comes
            from a counter-based generator (Philox) seeded from torch's CPU generator, is
            regenerated in the backward and never stored; see
            :func:`seqkernels.reference.dropout_keep_mask`.
        softcap: logit softcapping (Gemma 2): with softcap > 0 each scaled score s becomes
            softcap * tanh(s / softcap) before any mask is added or applied (flash-attn's
            order); 0 (the default) turns it off. Differentiable.
        window: a sliding window (left, right), flash-attn's ``window_size``: query i sees keys
            j with i + off - left <= j <= i + off + right, off = Lk - Lq (bottom-right, as
            ``causal``); -1 leaves that side unbounded. Combines with ``causal`` (which caps
            the right side at 0) and every mask. Key tiles outside every row's window are
            never visited, so the cost grows as O(Lq * window).
        alibi_slopes: ALiBi (BLOOM, MPT), float32 (heads,) or (batch, heads): each score gets
            -slope * |i + off - j| (off as for ``window``), after the cap and with the masks,
            flash-attn's convention. No gradient flows to the slopes.

    Returns:
        out (batch, heads, Lq, head_dim_v), or (out, lse). Differentiable in q, k, v (and
        through lse).

    Head dims (q/k and v, which may differ: MLA's 192 / 128 or 576 / 512) up to 1024 on the
    CPU and 256 on a GPU (a clear error beyond); float16, bfloat16, float32 and float64. On the CPU, float16 and
    bfloat16 inputs are computed in float32 (the C++ kernel takes float32 and float64).

    Example::

        >>> q = torch.randn(2, 8, 128, 64); k = v = torch.randn(2, 2, 128, 64)
        >>> out = seqkernels.flash_attention(q, k, v, causal=True)   # (2, 8, 128, 64)
    """
    tensors = (q, k, v) if attn_mask is None and key_lengths is None else tuple(
        t for t in (q, k, v, attn_mask, key_lengths) if isinstance(t, Tensor))
    if has_torch_function(tensors):  # a tensor subclass: its own __torch_function__ decides
        return handle_torch_function(flash_attention, tensors, q, k, v, causal, scale, return_lse,
                                     attn_mask=attn_mask, key_lengths=key_lengths, dropout_p=dropout_p,
                                     softcap=softcap, window=window, alibi_slopes=alibi_slopes)
    check_attention_inputs(q, k, v)
    _check_mask_args(q, k, attn_mask, key_lengths, dropout_p, "flash_attention")
    softcap = _check_softcap(softcap, "flash_attention")
    window = _check_window(window, "flash_attention")
    alibi_slopes = _check_alibi(alibi_slopes, q.shape[0], q.shape[1], q.device, "flash_attention")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if functorch_wrapped(q, k, v, attn_mask):  # torch.func transforms: the same math, materialized
        out, lse = _materialized_native(q, k, v, causal, scale, attn_mask, key_lengths, dropout_p, softcap, window,
                                        alibi_slopes)
    else:
        out, lse = _attention(q, k, v, causal, True, scale, attn_mask, key_lengths, dropout_p, softcap, window,
                              alibi_slopes)
    return (out, lse) if return_lse else out


script_unsupported(flash_attention, "seqkernels.flash_attention")


def _materialized_native(q, k, v, causal, scale, attn_mask, key_lengths, dropout_p, softcap=0.0, window=(-1, -1),
                         alibi_slopes=None):
    """flash_attention's math with the full score matrix in plain PyTorch ops, for
    torch.func transforms (grad, vmap, jacrev, ...), which the custom ops do not support."""
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(q.dtype)
    p = 0.0 if dropout_p >= 1.0 else float(dropout_p)
    out, lse = _materialized(q, k, v, causal, True, scale, attn_mask, key_lengths, p,
                             _new_rng_state() if p > 0.0 else None, softcap, *window, alibi_slopes)
    return (out * 0 if dropout_p >= 1.0 else out), lse
