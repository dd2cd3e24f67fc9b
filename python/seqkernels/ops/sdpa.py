"""``seqkernels.scaled_dot_product_attention``: the drop-in for torch's function.

It mirrors ``torch.nn.functional.scaled_dot_product_attention`` argument for argument,
edge cases included, and runs the flash kernels of :mod:`seqkernels.ops.attention`
whenever the call fits them. Calls that do not fit (rank 2, batch dims that broadcast, a
query with one head against several key heads, head dims of 0 or above
``MAX_HEAD_DIM``, empty sequences or batches, a float mask that requires grad) run the
exact materialized math here, so a call torch accepts is never refused.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function

from ..errors import ArgumentError, ArgumentTypeError
from ..reference.attention import causal_mask
from ..reference.philox import dropout_keep_mask
from ._common import functorch_wrapped, script_unsupported
from .attention import MAX_HEAD_DIM, _attention, _new_rng_state, is_causal_bias

_FN = "scaled_dot_product_attention"
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` on the fused kernels.

    Same signature, semantics and results: query (..., L, E), key (..., S, E), value
    (..., S, Ev), batch dims broadcast as in torch; ``attn_mask`` broadcastable to
    (..., L, S), boolean (True = takes part) or float (added), or torch's ``CausalBias``
    (``torch.nn.attention.bias.causal_upper_left`` / ``causal_lower_right``), which maps to
    the kernels' causal mask with its alignment and costs nothing to read; ``is_causal`` is
    torch's **top-left** causal mask and may not be combined with ``attn_mask`` (torch's
    RuntimeError); ``dropout_p`` is applied whenever it is > 0, as torch's function does;
    ``enable_gqa`` lets key/value have fewer heads (dim -3) than query.

    The flash kernels (O(L + S) extra memory) run every call of rank >= 3 with equal batch
    dims, compatible heads, 1 <= head dims <= 256 and non-empty inputs, except when a float
    ``attn_mask`` requires grad (its gradient is a full score matrix). Every other call
    torch accepts runs the exact materialized math (O(L * S) memory). NaN in any input
    reaches every output it touches; a query row that sees no key gives zeros, as torch's
    math backend does; S = 0 gives zeros, L = 0 an empty result. Tensor subclasses other
    than CausalBias go through their own ``__torch_function__``. Returns (..., L, Ev).
    """
    if is_causal_bias(attn_mask):
        return _with_causal_bias(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    tensors = tuple(t for t in (query, key, value, attn_mask) if isinstance(t, Tensor))
    if has_torch_function(tensors):
        return handle_torch_function(scaled_dot_product_attention, tensors, query, key, value, attn_mask=attn_mask,
                                     dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if is_causal and attn_mask is not None:
        raise ArgumentError("_scaled_dot_product_attention: Explicit attn_mask should not be set when is_causal=True")
    return _sdpa(query, key, value, attn_mask, dropout_p, bool(is_causal), False, scale, enable_gqa)


script_unsupported(scaled_dot_product_attention, "seqkernels.scaled_dot_product_attention")


def _with_causal_bias(query, key, value, bias, dropout_p, is_causal, scale, enable_gqa) -> Tensor:
    """torch's CausalBias holds no values (its storage is never written): it is the causal
    flag, upper-left (torch's is_causal) or lower-right (the kernels' bottom-right)."""
    from torch.nn.attention.bias import CausalVariant

    if is_causal:
        raise ArgumentError("CausalBias should not be used with causal=True")
    L, S = query.shape[-2], key.shape[-2]
    if (bias.seq_len_q, bias.seq_len_kv) != (L, S):
        raise ArgumentError(f"{_FN}: the CausalBias is for (L, S) = {(bias.seq_len_q, bias.seq_len_kv)}, but "
                            f"query and key have L = {L} and S = {S}")
    bottom_right = bias.variant == CausalVariant.LOWER_RIGHT and L != S
    return _sdpa(query, key, value, None, dropout_p, True, bottom_right, scale, enable_gqa)


def _check(query, key, value, attn_mask, dropout_p) -> None:
    """torch's checks, with torch's exception types (ours derive from them)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise ArgumentTypeError(f"{_FN}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ArgumentError(f"{_FN}: {name} must have at least 2 dims (..., seq, head_dim), got {tuple(t.shape)}")
    if not (query.dtype == key.dtype == value.dtype):
        raise ArgumentTypeError(f"{_FN}: Expected query, key, and value to have the same dtype, but got "
                                f"query.dtype: {query.dtype} key.dtype: {key.dtype} and value.dtype: {value.dtype}")
    if not query.dtype.is_floating_point:
        raise ArgumentTypeError(f"{_FN}: query, key and value must be floating point, got {query.dtype}")
    if not (query.device == key.device == value.device):
        raise ArgumentError(f"{_FN}: query, key and value must be on the same device, got "
                            f"{query.device}, {key.device}, {value.device}")
    if query.shape[-1] != key.shape[-1]:
        raise ArgumentError(f"{_FN}: query and key head dims differ: {query.shape[-1]} and {key.shape[-1]}")
    if key.shape[-2] != value.shape[-2]:
        raise ArgumentError(f"{_FN}: key and value lengths differ: {key.shape[-2]} and {value.shape[-2]}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ArgumentError(f"{_FN}: dropout_p must be a float in [0, 1], got {dropout_p!r}")
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise ArgumentTypeError(f"{_FN}: attn_mask must be a torch.Tensor, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            raise ArgumentTypeError(f"{_FN}: attn_mask must be bool or floating point, got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise ArgumentError(f"{_FN}: attn_mask must be on {query.device}, got {attn_mask.device}")


def _broadcast(*shapes) -> tuple:
    """numpy/torch broadcasting of int tuples (torch.broadcast_shapes is pure Python with
    symbolic-shape machinery: several microseconds of a decode step). Raises ValueError."""
    n = max(len(sh) for sh in shapes)
    out = [1] * n
    for sh in shapes:
        for i, d in enumerate(sh, n - len(sh)):
            if d != 1:
                if out[i] != 1 and out[i] != d:
                    raise ValueError(f"shapes {shapes} do not broadcast")
                out[i] = d
    return tuple(out)


def _batch_and_heads(query, key, value, enable_gqa):
    """(batch dims, query heads, kv heads) for inputs of rank >= 3. Raises torch's errors for
    batch dims that do not broadcast and heads that cannot pair."""
    try:
        lead = _broadcast(query.shape[:-3], key.shape[:-3], value.shape[:-3])
    except ValueError as e:
        raise ArgumentError(f"{_FN}: the batch dims of query {tuple(query.shape)}, key {tuple(key.shape)} and "
                            f"value {tuple(value.shape)} do not broadcast") from e
    hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
    if hk != hv:
        raise ArgumentError(f"{_FN}: key and value must have the same number of heads, got {hk} and {hv}")
    if hq != hk and hk != 1 and hq != 1:
        if not enable_gqa:
            raise ArgumentError(f"{_FN}: query has {hq} heads and key {hk}: pass enable_gqa=True for "
                                "grouped-query attention")
        if hq % hk != 0:
            raise ArgumentError(f"{_FN}: the query heads ({hq}) must be a multiple of the key/value heads ({hk})")
    return tuple(lead), hq, hk


def _sdpa(query, key, value, attn_mask, dropout_p, causal, bottom_right, scale, enable_gqa) -> Tensor:
    _check(query, key, value, attn_mask, dropout_p)
    if query.dim() != key.dim() or query.dim() != value.dim():
        raise ArgumentError(f"{_FN}: query, key and value must have the same rank, got "
                            f"{query.dim()}, {key.dim()}, {value.dim()}")
    if query.dim() == 2:  # (L, E): a rank-3 call with one head
        return _sdpa(query[None], key[None], value[None], attn_mask, dropout_p, causal, bottom_right, scale,
                     enable_gqa)[0]
    lead, hq, hk = _batch_and_heads(query, key, value, enable_gqa)
    L, S, E, Ev = query.shape[-2], key.shape[-2], query.shape[-1], value.shape[-1]
    out_shape = (*lead, max(hq, hk), L, Ev)
    if attn_mask is not None:
        try:
            full = _broadcast(tuple(attn_mask.shape), out_shape[:-1] + (S,))
        except ValueError:
            full = None
        if attn_mask.dim() > len(out_shape) or full != out_shape[:-1] + (S,):
            raise ArgumentError(f"{_FN}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                                f"{out_shape[:-1] + (S,)}")
    B = math.prod(lead)
    fits = (query.dtype in _KERNEL_DTYPES and B > 0 and L > 0 and S > 0 and hq >= hk and hq % hk == 0
            and 1 <= E <= MAX_HEAD_DIM and 1 <= Ev <= MAX_HEAD_DIM
            and not (attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.requires_grad)
            and not functorch_wrapped(query, key, value, attn_mask))
    if not fits:
        return _materialized(query, key, value, attn_mask, dropout_p, causal, bottom_right, scale, out_shape)
    if query.dim() == 4 and query.shape[0] == key.shape[0] == value.shape[0]:  # the common case: views as they are
        q, k, v = query, key, value
    else:
        q = query.expand(*lead, *query.shape[-3:]).reshape(B, hq, L, E)
        k = key.expand(*lead, *key.shape[-3:]).reshape(B, hk, S, E)
        v = value.expand(*lead, *value.shape[-3:]).reshape(B, hk, S, Ev)
    mask4 = attn_mask
    if attn_mask is not None and (attn_mask.dim() > 4 or (attn_mask.dim() == 4 and len(lead) > 1)):
        # fold the leading batch dims into one (a copy only where they mix broadcast and not)
        mask4 = attn_mask.expand(*lead, *attn_mask.shape[-3:]).reshape(B, *attn_mask.shape[-3:])
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)
    out, _ = _attention(q, k, v, causal, bottom_right, scale, mask4, None, dropout_p)
    return out if out.shape == out_shape else out.reshape(out_shape)


def _materialized(query, key, value, attn_mask, dropout_p, causal, bottom_right, scale, out_shape) -> Tensor:
    """The exact math with the full (L, S) matrix, for the calls the kernels do not take;
    differentiable by autograd (the float-mask gradient included). Dropout draws the
    kernels' Philox mask over the broadcast score shape."""
    L, S, E = query.shape[-2], key.shape[-2], query.shape[-1]
    hq, hk = query.shape[-3], key.shape[-3]
    if hk != hq and hk != 1 and hq != 1:  # grouped-query heads
        key, value = key.repeat_interleave(hq // hk, dim=-3), value.repeat_interleave(hq // hk, dim=-3)
    scores = query @ key.transpose(-2, -1)
    if E > 0:  # with E = 0 every score is 0 whatever the scale (torch: 1/sqrt(0) is never applied)
        scores = scores * (1.0 / math.sqrt(E) if scale is None else float(scale))
    if causal:
        scores = scores.masked_fill(~causal_mask(L, S, bottom_right=bottom_right, device=query.device), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(scores.dtype)
    scores = scores.expand(out_shape[:-1] + (S,))
    if S == 0:  # no key: zeros, still connected to the inputs for autograd
        return (scores @ value).expand(out_shape)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max).detach()
    e = torch.exp(scores - row_max)
    total = e.sum(dim=-1, keepdim=True)
    probs = e / torch.where(total == 0, torch.ones_like(total), total)  # a row with no visible key: zeros
    if dropout_p >= 1.0:
        probs = probs * 0
    elif dropout_p > 0.0:
        seed = int(_new_rng_state()[0])
        keep = dropout_keep_mask(tuple(probs.shape), float(dropout_p), seed, 0, device=probs.device)
        probs = probs * keep / (1.0 - dropout_p)
    return probs @ value
