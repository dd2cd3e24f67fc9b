"""Philox4x32-10 and the dropout mask of the fused attention kernels, in plain torch.

Philox (Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2, 3",
SC 2011) is a counter-based generator: block ``counter`` under key ``seed`` gives four
32-bit words, with no state carried between blocks. That is what lets the attention
kernels regenerate the dropout mask of any tile in the backward instead of storing it.

The convention (the same in ``csrc/attention/masking.h`` and ``kernels/``): in a
(B, H, Lq, Lk) problem, row r = (b*H + h)*Lq + i owns the ceil(Lk/4) blocks from
offset + r*ceil(Lk/4), and score (b, h, i, j) uses word j % 4 of block
offset + r*ceil(Lk/4) + j // 4. A block is the Philox output for the counter (block number:
low word, high word, then two zero words) and key (seed low word, seed high word). The
score is kept when its word is >= round(p * 2**32). This module computes it with int64 tensor arithmetic, an
implementation independent of the kernels', so the tests can check them against it.
"""

from __future__ import annotations

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def _mul_hi_lo(a: Tensor, const: int) -> tuple[Tensor, Tensor]:
    """(a * const) >> 32 and (a * const) & 0xffffffff for 32-bit a and const, in int64.

    The full product needs 64 unsigned bits; splitting const into 16-bit halves keeps every
    intermediate below 2**49.
    """
    c_hi, c_lo = const >> 16, const & 0xFFFF
    lo_part = a * c_lo
    hi = (a * c_hi + (lo_part >> 16)) >> 16
    lo = (a * const) & _M32  # wraps in int64, but the low 32 bits are exact
    return hi, lo


def philox4x32_10(counter: Tensor, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four 32-bit words (as int64 tensors) of Philox4x32-10 for each 64-bit ``counter``."""
    counter = counter.to(torch.int64)
    c0, c1 = counter & _M32, (counter >> 32) & _M32
    c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(c2, _ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """Words >= this are kept: round(p * 2**32), at most 2**32 - 1."""
    return min(int(round(p * 4294967296.0)), _M32)


def dropout_keep_mask(shape: tuple[int, int, int, int], p: float, seed: int, offset: int = 0,
                      device=None) -> Tensor:
    """Boolean (B, H, Lq, Lk) mask, True where the kernels keep a probability under dropout p."""
    lk = shape[-1]
    rows = torch.arange(int(torch.Size(shape[:-1]).numel()), dtype=torch.int64, device=device)
    cols = torch.arange(lk, dtype=torch.int64, device=device)
    block = offset + rows[:, None] * ((lk + 3) // 4) + cols[None, :] // 4
    words = philox4x32_10(block.reshape(-1), seed)
    lane = (cols % 4).expand(rows.shape[0], lk).reshape(-1)
    word = torch.where(lane == 0, words[0], torch.where(lane == 1, words[1],
                                                        torch.where(lane == 2, words[2], words[3])))
    return (word >= dropout_threshold(p)).reshape(shape)
