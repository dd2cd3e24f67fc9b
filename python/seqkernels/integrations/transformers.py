"""seqkernels as the attention of Hugging Face transformers models.

::

    import seqkernels.integrations.transformers as skt
    skt.register()                                   # once per process; name "seqkernels"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="seqkernels")
    # or: from_pretrained(path, attn_implementation="seqkernels")
    # or: model.set_attn_implementation("seqkernels"); or: skt.apply(model)

:func:`register` registers two things under one name, and both are needed: the attention
function (transformers' ``AttentionInterface``) and the mask function
(``AttentionMaskInterface``). With only the first, transformers builds **no mask at all**
for a name it does not know, and padding, sliding windows and packed sequences are dropped
without a warning. The mask function is transformers' own ``sdpa_mask``: the kernels get
exactly the boolean masks (or ``None``) that torch's SDPA gets, and read them in place
(never expanded), so key tiles a mask hides entirely (left padding, the far side of a
sliding window) are skipped and mixed tiles are computed only up to their last shown key.
Right padding, the common case in training and for encoders, is recognised in eager mode
and runs as ``key_lengths`` (see :func:`mask_function`), which costs nothing to read.
Packed batches (sequences concatenated in a row, ``position_ids`` restarting at each, no
padding mask: transformers' packed-sequence format) are recognised in eager mode too (the
mask is checked to be exactly causal within each sequence, and the sliding window) and run
as :func:`seqkernels.flash_attention_varlen`, where no tile spans two sequences.

The attention function keeps the contract of transformers' sdpa integration (the same
arguments, the same causality rule, ``(batch, seq, heads, head_dim)`` output) and runs
:func:`seqkernels.scaled_dot_product_attention`, which mirrors torch's function exactly:

- grouped-query attention without repeating the K/V heads;
- causal by sdpa's rule: top-left ``is_causal`` only when no mask is given and more than one
  query row is computed, which is also right for a static cache's prefill (keys longer
  than queries: the empty slots are in the future of every query);
- dropout in training (the kernels' Philox dropout);
- decode steps (one query row, or a few) take the kernels' decode regime by themselves;
- no Python-side state: ``torch.compile(model, fullgraph=True)`` gives one graph.

Arguments the kernels do not implement are never ignored: ``softcap`` (Gemma 2) runs on the
kernels (where they cannot take the call, a static cache's prefill or a float mask, an
exact materialized fallback); ``sliding_window``
is in the mask transformers builds (and applied here if a call comes without a mask);
``position_bias`` (T5) becomes an additive float mask, as in transformers' sdpa path;
attention sinks (``s_aux``) raise a clear error; ``output_attentions=True`` warns, as
transformers' sdpa does, and returns no weights.

Needs ``transformers`` (``pip install 'seqkernels[transformers]'``); ``import seqkernels``
never imports it. Tested with transformers 5.24.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..errors import ArgumentError
from ..reference.attention import causal_mask
from ..ops.attention import MAX_HEAD_DIM, _materialized, _new_rng_state, flash_attention
from ..ops.varlen import flash_attention_varlen
from ..ops.sdpa import scaled_dot_product_attention

DEFAULT_NAME = "seqkernels"
INSTALL_HINT = "pip install 'seqkernels[transformers]'  (or: pip install 'transformers>=5.0')"
# transformers gives names containing these words their own routing (the hub kernel loader for
# "flash", torch-SDPA availability checks for "sdpa", ...), so a registration under such a name
# would never reach the functions registered here.
_ROUTED_WORDS = ("flash", "sdpa", "flex_attention", "eager", "paged", "|")

__all__ = ["DEFAULT_NAME", "apply", "attention_forward", "mask_function", "register"]


def _transformers():
    """The client's pieces, imported on first use, with an install hint when missing."""
    try:
        import transformers
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as e:
        raise ImportError("seqkernels.integrations.transformers needs Hugging Face transformers >= 5.0, "
                          f"which is not installed here: {INSTALL_HINT}") from e
    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        raise ImportError(f"seqkernels.integrations.transformers needs transformers >= 5.0, found "
                          f"{transformers.__version__}: {INSTALL_HINT}")
    return AttentionInterface, AttentionMaskInterface, sdpa_mask


def register(name: str = DEFAULT_NAME) -> str:
    """Register seqkernels' attention and mask functions in transformers under ``name``.

    After this, ``attn_implementation=name`` works in ``from_config``, ``from_pretrained``
    and ``set_attn_implementation``. Registering again is harmless. Returns ``name``.

    Raises ``ValueError`` for a name that transformers routes elsewhere (one containing
    "flash", "sdpa", "flex_attention", "eager", "paged" or "|"), and ``ImportError`` with the
    install command when transformers is missing.
    """
    if not isinstance(name, str) or not name:
        raise ArgumentError(f"register: name must be a non-empty string, got {name!r}")
    routed = [w for w in _ROUTED_WORDS if w in name]
    if routed:
        raise ArgumentError(f"register: name {name!r} contains {routed[0]!r}, which transformers routes to its own "
                            "implementations (a name with 'flash' goes to the hub kernel loader), so the "
                            f"seqkernels functions would never run; use a name without it, e.g. {DEFAULT_NAME!r}")
    attention_interface, mask_interface, _ = _transformers()
    attention_interface.register(name, attention_forward)
    mask_interface.register(name, mask_function)
    return name


# The attribute a mask from mask_function carries when it is exactly "right padding" (with
# the causal rule or without): (key_lengths (B,) int64, causal). Read by attention_forward.
_LENGTHS_ATTR = "_seqkernels_key_lengths"


def mask_function(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask: Optional[Tensor] = None, **kwargs):
    """transformers' ``sdpa_mask`` (the same boolean mask, or None), plus one fast form.

    When the mask is exactly key padding at the end of each row (right padding), with
    transformers' plain causal rule on a square problem or bidirectional, the returned
    mask carries the key lengths, and :func:`attention_forward` runs the kernels with
    ``key_lengths`` (and the causal flag) instead of reading the mask: padded key tiles are
    then never visited. Eager mode only (the check reads the 2-D mask's values); under
    torch.compile the mask is read in place, with the same result.
    """
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

    if mask_function is None:
        mask_function = causal_mask_function
    mask = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs)
    causal = mask_function is causal_mask_function
    if (mask is None or attention_mask is None or torch.compiler.is_compiling()
            or not (causal or mask_function is bidirectional_mask_function)
            or not (isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == kv_offset == 0)
            or (causal and q_length != kv_length) or attention_mask.dim() != 2
            or attention_mask.shape != (batch_size, kv_length)):
        return mask
    keep = attention_mask.bool()
    lengths = keep.sum(-1)
    if torch.equal(keep, torch.arange(kv_length, device=keep.device) < lengths[:, None]):
        setattr(mask, _LENGTHS_ATTR, (lengths, causal))
    return mask


def apply(model, name: str = DEFAULT_NAME):
    """Switch an already built transformers model to seqkernels attention, in place:
    :func:`register` then ``model.set_attn_implementation(name)``. Returns the model."""
    model.set_attn_implementation(register(name))
    return model


def _warn_output_attentions() -> None:
    from transformers.utils import logging

    logging.get_logger(__name__).warning_once(
        "seqkernels attention does not support `output_attentions=True` (the fused kernels never form the "
        "attention weights); no weights are returned. Set the attention to `eager` to get them.")


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention contract on the seqkernels kernels.

    query (B, H, Lq, D), key and value (B, Hk, Lk, D / Dv) with Hk dividing H;
    ``attention_mask`` None, boolean (True = attend) or additive float, broadcastable to
    (B, H, Lq, Lk). Returns ((B, Lq, H, Dv) output, None).
    """
    if kwargs.get("output_attentions", False):
        _warn_output_attentions()
    if kwargs.get("s_aux") is not None:
        raise ArgumentError("seqkernels attention does not implement attention sinks (s_aux); use "
                            "attn_implementation='eager' for this model")
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # transformers' sdpa rule: the causal flag (top-left) only without a mask and beyond one query row
    causal = q_len > 1 and attention_mask is None and bool(is_causal)

    window = kwargs.get("sliding_window")
    if attention_mask is None and window is not None and kv_len > window:
        # transformers puts the window into the mask it builds; a call without one gets it here
        attention_mask = _window_mask(q_len, kv_len, int(window), causal, query.device)
        causal = False

    position_bias = kwargs.get("position_bias")
    if position_bias is not None:  # T5-style learned bias: an additive float mask, as in the sdpa path
        attention_mask = _with_position_bias(position_bias, attention_mask, causal, q_len, kv_len, query.dtype)
        causal = False

    softcap = float(kwargs.get("softcap") or 0.0)
    packed = _packed_batch(query, key, attention_mask, kwargs.get("position_ids"), window, bool(is_causal))
    if packed is not None:
        # packed sequences (position_ids that restart, no padding): varlen, no tile crosses
        # two sequences; out (B * L, H, Dv) is already transformers' (B, L, H, Dv) layout
        cu, longest = packed
        B, H, L, _ = query.shape
        rows = lambda t: t.transpose(1, 2).reshape(B * L, t.shape[1], t.shape[3])  # noqa: E731
        out = flash_attention_varlen(rows(query), rows(key), rows(value), cu, cu, longest, longest, causal=True,
                                     scale=scaling, window=(-1, -1) if window is None else (int(window) - 1, 0),
                                     softcap=softcap, dropout_p=dropout)
        return out.view(B, L, H, value.shape[3]), None
    fast = getattr(attention_mask, _LENGTHS_ATTR, None) if attention_mask is not None else None
    if fast is not None and attention_mask.shape[-2:] == (q_len, kv_len):
        # right padding from mask_function: key lengths (and the causal flag), the same visibility
        lengths, causal = fast
        out = flash_attention(query, key, value, causal=causal, scale=scaling, key_lengths=lengths,
                              dropout_p=dropout, softcap=softcap)
    elif _kernel_call(query, key, value, attention_mask) and (not causal or q_len == kv_len):
        # the native entry point (bottom-right causal = top-left here): a decode step's fixed
        # cost is several microseconds lower than through the drop-in's broadcasting checks
        out = flash_attention(query, key, value, causal=causal, scale=scaling, attn_mask=attention_mask,
                              dropout_p=dropout, softcap=softcap)
    elif softcap:  # a top-left causal flag with Lk > Lq, or a float mask: exact math
        out = _softcap_math(query, key, value, attention_mask, dropout, scaling, causal, softcap)
    else:  # everything else torch's function takes: static-cache prefill, float masks with grad, ...
        out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                           is_causal=causal, scale=scaling,
                                           enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _packed_batch(query: Tensor, key: Tensor, mask: Optional[Tensor], position_ids: Optional[Tensor],
                  window: Optional[int], causal: bool) -> Optional[tuple[Tensor, int]]:
    """(cu_seqlens, longest) when the call is a packed batch: position_ids that restart
    within a row (transformers' packed-sequence detection, which it does only without a
    padding mask) and a boolean mask that is exactly causal attention within each sequence
    (and the sliding window, if any), which is checked. None otherwise, and under
    torch.compile (the check reads values): the mask is then read in place."""
    if (position_ids is None or mask is None or mask.dtype != torch.bool or not causal
            or torch.compiler.is_compiling() or query.dim() != 4):
        return None
    # every layer gets the same mask tensor and position_ids: decide once per forward
    cached = getattr(mask, _PACKED_ATTR, None)
    if cached is not None and cached[0] is position_ids and cached[1] == (query.shape, key.shape[2], window):
        return cached[2]
    packed = _find_packed(query, key, mask, position_ids, window)
    setattr(mask, _PACKED_ATTR, (position_ids, (query.shape, key.shape[2], window), packed))
    return packed


# The attribute where _packed_batch keeps its answer for a mask: (position_ids, shapes and
# window it was computed for, answer).
_PACKED_ATTR = "_seqkernels_packed"


def _find_packed(query: Tensor, key: Tensor, mask: Tensor, position_ids: Tensor,
                 window: Optional[int]) -> Optional[tuple[Tensor, int]]:
    """_packed_batch's check itself (reads values: eager only)."""
    B, _, L, _ = query.shape
    if key.shape[2] != L or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != (L, L) \
            or mask.shape[0] not in (1, B) or position_ids.dim() != 2 or position_ids.shape[-1] != L:
        return None
    pos = position_ids.expand(B, L)
    start = torch.ones(B, L, dtype=torch.bool, device=pos.device)
    start[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    if int(start.sum()) == B:  # one sequence per row: not packed
        return None
    seq = start.cumsum(-1)
    i, j = torch.arange(L, device=pos.device)[:, None], torch.arange(L, device=pos.device)[None, :]
    expected = (seq[:, :, None] == seq[:, None, :]) & (j <= i)
    if window is not None:
        expected &= j > i - int(window)
    if not torch.equal(mask.expand(B, 1, L, L)[:, 0], expected.to(mask.device)):
        return None
    cu = torch.cat([start.reshape(-1).nonzero().flatten(), torch.tensor([B * L], device=pos.device)])
    cu = cu.to(device=query.device, dtype=torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _kernel_call(query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor]) -> bool:
    """Whether flash_attention takes the call as it is (transformers' shapes are (B, H, L, D),
    with equal batches): no mask or a boolean one, non-empty, head dims the kernels have."""
    return ((mask is None or mask.dtype == torch.bool) and query.dim() == 4 and query.numel() > 0
            and key.shape[2] > 0 and query.shape[0] == key.shape[0]
            and query.shape[-1] <= MAX_HEAD_DIM and value.shape[-1] <= MAX_HEAD_DIM)


def _positions(q_len: int, kv_len: int, top_left: bool, device) -> tuple[Tensor, Tensor]:
    """Query and key positions: top-left (the causal flag's alignment) or bottom-right (a
    query block at the end of its keys, as a cache gives)."""
    offset = 0 if top_left else kv_len - q_len
    return (torch.arange(q_len, device=device) + offset)[:, None], torch.arange(kv_len, device=device)[None, :]


def _window_mask(q_len: int, kv_len: int, window: int, causal: bool, device) -> Tensor:
    """transformers' sliding-window rule, query i sees keys j with i - window < j (<= i if
    causal), as a (1, 1, Lq, Lk) boolean mask."""
    i, j = _positions(q_len, kv_len, causal, device)
    keep = j > i - window
    if causal:
        keep = keep & (j <= i)
    return keep[None, None]


def _with_position_bias(bias: Tensor, mask: Optional[Tensor], causal: bool, q_len: int, kv_len: int,
                        dtype: torch.dtype) -> Tensor:
    """An additive float mask: the bias where a key is visible, the dtype's minimum (as
    transformers uses) where it is not; differentiable in the bias."""
    bias = bias[..., :kv_len]
    hidden_value = torch.finfo(dtype).min
    if mask is None and causal:
        mask = causal_mask(q_len, kv_len, device=bias.device)[None, None]
    if mask is None:
        return bias.to(dtype)
    if mask.dtype == torch.bool:
        return torch.where(mask, bias.to(dtype), hidden_value)
    return bias.to(dtype) + mask.to(dtype)


def _softcap_math(query, key, value, mask, dropout, scaling, causal, softcap) -> Tensor:
    """Exact attention with tanh logit softcapping for the calls the kernels do not take: the
    same materialized math the op bodies run off the kernels (seqkernels.reference, the
    kernels' Philox dropout; top-left causal), half inputs computed in float32."""
    dtype = query.dtype
    if dtype in (torch.float16, torch.bfloat16):
        query, key, value = query.float(), key.float(), value.float()
        mask = mask.float() if mask is not None and mask.dtype != torch.bool else mask
    scale = 1.0 / math.sqrt(query.shape[-1]) if scaling is None else float(scaling)
    p = 0.0 if dropout >= 1.0 else float(dropout)  # every probability dropped: zeros, as flash_attention gives
    out, _ = _materialized(query, key, value, causal, False, scale, mask, None, p,
                           _new_rng_state() if p > 0.0 else None, softcap)
    return (out * 0 if dropout >= 1.0 else out).to(dtype)
