"""Drop-in ``torch.nn.MultiheadAttention`` on the fused attention kernels.

:class:`MultiheadAttention` subclasses torch's module: constructor, parameters,
``state_dict`` keys and ``repr`` are torch's own, so weights load without conversion and
``seqkernels.nn.convert`` can swap the class of an existing module in place. Only
``forward`` differs: with ``need_weights=False`` the heads run on the flash kernels
(O(L + S) memory); with ``need_weights=True`` the attention weights must be returned,
which only the materialized (L, S) matrix can give, so that call computes everything
with the exact materialized math (O(L * S) memory), as torch does.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ModuleArgumentError, ModuleArgumentTypeError
from ..ops import attention as _ops
from ._script import NotScriptable
from ..reference.transformer import multi_head_attention as _materialized_mha


def _check_mask(mask: Optional[Tensor], name: str) -> None:
    if mask is not None and mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise ModuleArgumentTypeError(f"MultiheadAttention: {name} must be bool or floating point, got {mask.dtype}")


def _key_lengths(key_padding_mask: Tensor) -> Optional[Tensor]:
    """Per-batch key lengths when a boolean key_padding_mask (True = pad) only pads a
    suffix of every row, else None. Lengths let the kernels skip the padded key tiles."""
    if key_padding_mask.dtype != torch.bool or torch.compiler.is_compiling():
        return None
    lengths = (~key_padding_mask).sum(dim=1)
    positions = torch.arange(key_padding_mask.shape[1], device=key_padding_mask.device)
    if torch.equal(positions >= lengths.unsqueeze(1), key_padding_mask):
        return lengths
    return None


class MultiheadAttention(NotScriptable, torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` (same arguments and parameters) on seqkernels' kernels.

    forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) takes and returns what torch's does: masks
    follow torch.nn (boolean True = *not* allowed, float = added); ``attn_mask`` is (L, S) or
    (N * num_heads, L, S), ``key_padding_mask`` (N, S); ``is_causal`` is a hint that
    ``attn_mask`` is the causal mask, which must be given.

    - ``need_weights=False``: projections with torch's linear, attention on the fused
      kernels with the masks read in place (a boolean key_padding_mask that pads a suffix
      of each sequence becomes per-batch key lengths, so padded keys cost nothing) and
      dropout regenerated from Philox counters in the backward.
    - ``need_weights=True`` (torch's default): the weights exist only as the full
      (N, heads, L, S) matrix, so this call runs the materialized math: exact, but
      O(L * S) memory. Pass ``need_weights=False`` for the fused path.

    A query row that no key may attend gives zeros here (torch gives NaN on some paths).
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        if is_causal and key_padding_mask is None and not need_weights and attn_mask is not None:
            # torch's path: the is_causal hint replaces attn_mask (which it does not check)
            self._check_inputs(query, key, value, key_padding_mask, None, False)
        else:
            self._check_inputs(query, key, value, key_padding_mask, attn_mask, is_causal)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            return _materialized_mha(
                query, key, value, self.num_heads, self.in_proj_weight, self.in_proj_bias,
                self.out_proj.weight, self.out_proj.bias, q_proj_weight=self.q_proj_weight,
                k_proj_weight=self.k_proj_weight, v_proj_weight=self.v_proj_weight,
                bias_k=self.bias_k, bias_v=self.bias_v, add_zero_attn=self.add_zero_attn,
                dropout_p=dropout, key_padding_mask=key_padding_mask, need_weights=True,
                attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal,
                batch_first=self.batch_first)
        return self._fused(query, key, value, key_padding_mask, attn_mask, is_causal, dropout), None

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask, is_causal) -> None:
        fn = "MultiheadAttention"
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise ModuleArgumentTypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != query.dim() or t.dim() not in (2, 3):
                raise ModuleArgumentError(f"{fn}: query, key and value must all be 2-D (unbatched) or 3-D, got "
                                 f"{query.dim()}, {key.dim()}, {value.dim()} dims")
        if query.shape[-1] != self.embed_dim:
            raise ModuleArgumentError(f"{fn}: query's last dim must be embed_dim = {self.embed_dim}, got {query.shape[-1]}")
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ModuleArgumentError(f"{fn}: key and value last dims must be kdim = {self.kdim} and vdim = {self.vdim}, "
                             f"got {key.shape[-1]} and {value.shape[-1]}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ModuleArgumentError(f"{fn}: key and value must have the same leading shape, got "
                             f"{tuple(key.shape)} and {tuple(value.shape)}")
        _check_mask(attn_mask, "attn_mask")
        _check_mask(key_padding_mask, "key_padding_mask")
        if is_causal and attn_mask is None:
            raise RuntimeError(f"{fn}: is_causal is a hint that attn_mask is the causal mask; attn_mask "
                               "must be given too (torch raises the same)")
        batched = query.dim() == 3
        N = (query.shape[0] if self.batch_first else query.shape[1]) if batched else 1
        L = query.shape[-2] if (not batched or self.batch_first) else query.shape[0]
        S = key.shape[-2] if (not batched or self.batch_first) else key.shape[0]
        if batched and (key.shape[0 if self.batch_first else 1] != N):
            raise ModuleArgumentError(f"{fn}: query and key batch sizes differ")
        if key_padding_mask is not None:
            want = (N, S) if batched else (S,)
            if tuple(key_padding_mask.shape) != want:
                raise ModuleArgumentError(f"{fn}: key_padding_mask must have shape {want}, got "
                                 f"{tuple(key_padding_mask.shape)}")
        if attn_mask is not None and tuple(attn_mask.shape) not in ((L, S), (N * self.num_heads, L, S)):
            raise ModuleArgumentError(f"{fn}: attn_mask must have shape {(L, S)} or {(N * self.num_heads, L, S)}, "
                             f"got {tuple(attn_mask.shape)}")

    def _fused(self, query, key, value, key_padding_mask, attn_mask, is_causal, dropout) -> Tensor:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        N, L, E = query.shape
        H, hd = self.num_heads, self.head_dim

        if self._qkv_same_embed_dim:
            if query is key and key is value:  # self-attention: one packed projection
                q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
            else:
                w = self.in_proj_weight.chunk(3)
                b = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
                q, k, v = F.linear(query, w[0], b[0]), F.linear(key, w[1], b[1]), F.linear(value, w[2], b[2])
        else:
            b = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
            q = F.linear(query, self.q_proj_weight, b[0])
            k = F.linear(key, self.k_proj_weight, b[1])
            v = F.linear(value, self.v_proj_weight, b[2])

        # Extra key/value positions (bias_k/v, add_zero_attn) take part for every query.
        extra = []
        if self.bias_k is not None and self.bias_v is not None:
            extra.append((self.bias_k.reshape(1, 1, E).expand(N, 1, E), self.bias_v.reshape(1, 1, E).expand(N, 1, E)))
        if self.add_zero_attn:
            extra.append((k.new_zeros(N, 1, E), v.new_zeros(N, 1, E)))
        for ek, ev in extra:
            k, v = torch.cat([k, ek], dim=1), torch.cat([v, ev], dim=1)
        S = k.shape[1]
        n_extra = len(extra)

        # torch.nn masks -> the kernels' (True = takes part, float = added), broadcast as 4-D.
        causal = False
        mask = None
        lengths = None
        if is_causal and key_padding_mask is None:
            causal = True  # torch too drops the (causal) attn_mask for is_causal here
        else:
            if attn_mask is not None:
                am = attn_mask.reshape(-1, H, L, attn_mask.shape[-1]) if attn_mask.dim() == 3 else attn_mask
                am = ~am if am.dtype == torch.bool else am.to(q.dtype)
                mask = _with_extra_keys(am, n_extra)
            if key_padding_mask is not None:
                lengths = _key_lengths(key_padding_mask) if n_extra == 0 and mask is None else None
                if lengths is None:
                    kp = ~key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask.to(q.dtype)
                    kp = _with_extra_keys(kp, n_extra).reshape(N, 1, 1, S)
                    mask = kp if mask is None else _combine(mask, kp, q.dtype)

        def heads(t):  # (N, len, E) -> (N, H, len, hd)
            return t.reshape(N, t.shape[1], H, hd).transpose(1, 2)

        out, _ = _ops._attention(heads(q), heads(k), heads(v), causal, False, hd ** -0.5, mask, lengths, dropout)
        out = F.linear(out.transpose(1, 2).reshape(N, L, E), self.out_proj.weight, self.out_proj.bias)
        if unbatched:
            return out.squeeze(0)
        return out if self.batch_first else out.transpose(0, 1)


def _with_extra_keys(mask: Tensor, n: int) -> Tensor:
    """The mask (kernels' convention) with n more key columns that every query may attend
    (the bias_k/v and add_zero_attn positions)."""
    return F.pad(mask, (0, n), value=True if mask.dtype == torch.bool else 0.0)


def _combine(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """One mask from two in the kernels' convention (both boolean: and; else added)."""
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    neg_inf = torch.full((), float("-inf"), dtype=dtype, device=a.device)
    zero = torch.zeros((), dtype=dtype, device=a.device)
    to_add = [torch.where(m, zero, neg_inf) if m.dtype == torch.bool else m for m in (a, b)]
    return to_add[0] + to_add[1]
