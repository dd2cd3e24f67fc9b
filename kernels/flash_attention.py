"""Flash attention in Triton: forward and backward, exact, O(n) memory.

out = softmax(Q K^T * scale + causal mask) V, one (query block, key block) tile at a
time with an online softmax in base 2 (exp2 with log2(e) folded into the scale). The
forward writes O and the natural-log LSE of each row (fp32). The backward recomputes the
probabilities from the LSE:

    preprocess   delta_i = rowsum(dO_i * O_i) - dLSE_i                         (fp32)
    dK, dV       one program per key block: loops over the query heads of its GQA group
                 and the query blocks that see it; dV += P^T dO, dK += dS^T Q
    dQ           one program per query block: loops over the key blocks it sees;
                 dQ += dS K,  with dS = P * (dO V^T - delta)

Every output element has exactly one writer (no atomics), so the backward is
deterministic: the same inputs give bitwise the same gradients.

Optional, selected by constexpr flags so that the plain kernels carry none of it:
MASK_KIND 1 (boolean attn_mask, True = takes part) or 2 (additive, in natural-log units,
so scaled by log2(e) here), read through four strides (0 on broadcast dims); HAS_LENGTHS
(per-batch key lengths: the key loops stop at the length, so padded keys cost nothing);
DROPOUT (Philox through tl.randint4x with the counter convention of
csrc/attention/masking.h and seqkernels.reference.philox, so GPU, CPU and the Python
reference draw the same mask; regenerated in both backward kernels, never stored);
SOFTCAP (scores s -> softcap * tanh(s / softcap) before every mask, the backward through
its slope 1 - tanh^2); WINDOW (flash-attn's sliding window: query i sees keys
i + offset - wl .. i + offset + wr, -1 = unbounded; the key and query loops cover only the
tiles inside it); ALIBI (score -= slope[b, h] * |i + offset - j|, slopes fp32 at
AL + b * sab + h).

Layout: q (B, H, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv), any strides with unit
stride in the last dim; Hk divides H. Causal: query i sees key j when j <= i + offset,
offset = Lk - Lq (bottom-right) or 0 (top-left). A row that sees no key gets zeros,
LSE -inf and zero gradients. float16 / bfloat16 with fp32 accumulation and fp32 softmax
statistics, and float32 (F32: fp32 FMA products, with their own small-tile configs).

Configs: on a GPU the block sizes are autotuned per architecture over CONFIGS (the AOT
compile test checks every one of them for shared memory, spills and wgmma); without a GPU
driver (TRITON_INTERPRET=1 on CPU tensors) the first config of the class is used, since
Triton's autotuner needs a driver.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# float32 inputs: the products run as true fp32 FMAs ("ieee"). TF32 tensor cores would be
# faster but round the inputs to 10 mantissa bits; "tf32x3" (three TF32 products) is
# accurate but keeps the split operands live and spilled registers in every masked config.
F32_PRECISION = tl.constexpr("ieee")
LN2 = 0.6931471805599453


@triton.jit
def _load_rows(base, rows, n_rows, row_stride, feats, n_feats):
    """Tile (rows x feats) of a row-major matrix, zero outside [0, n_rows) x [0, n_feats)."""
    return tl.load(base + rows[:, None] * row_stride + feats[None, :],
                   mask=(rows[:, None] < n_rows) & (feats[None, :] < n_feats), other=0.0)


@triton.jit
def _load_rows_t(base, rows, n_rows, row_stride, feats, n_feats):
    """The same tile transposed, (feats x rows): K^T and V^T operands of the dots."""
    return tl.load(base + rows[None, :] * row_stride + feats[:, None],
                   mask=(rows[None, :] < n_rows) & (feats[:, None] < n_feats), other=0.0)


@triton.jit
def _causal_key_end(pid_m, Lk, offset, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """One past the last key any query of block pid_m can see."""
    kend = Lk
    if CAUSAL:
        kend = tl.minimum(Lk, tl.maximum(0, (pid_m + 1) * BLOCK_M + offset))
    return kend


@triton.jit
def _key_limit(KL, b, Lk, HAS_LENGTHS: tl.constexpr):
    """One past the last key of batch b that is not padding."""
    kl = Lk
    if HAS_LENGTHS:
        kl = tl.minimum(tl.maximum(tl.load(KL + b).to(tl.int32), 0), Lk)
    return kl


@triton.jit
def _tanh(x):
    """tanh through exp2 (tl has none): 1 - 2 / (e^2x + 1); +-1 at large |x|, NaN kept."""
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def _logits(s, qk_scale, softcap, SOFTCAP: tl.constexpr):
    """Raw products q.k -> base-2 logits (qk_scale = scale * log2(e)), capped with SOFTCAP:
    (softcap * tanh(scale * s / softcap) * log2(e), the tanh); (s * qk_scale, s) when off."""
    if SOFTCAP:
        t = _tanh(s * (qk_scale * 0.6931471805599453 / softcap))
        return t * (softcap * 1.4426950408889634), t
    return s * qk_scale, s


@triton.jit
def _mask_scores(s, b, h, rows, cols, Lq, Lk, kl, offset, M, smb, smh, smm, smn, wl, wr, AL, sab,
                 CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, WINDOW: tl.constexpr, ALIBI: tl.constexpr):
    """Scores s (base-2 units) of the tile rows x cols with every mask applied: -inf where a
    key is out of range, padding, causally hidden, outside the window or masked off; the
    additive mask and ALiBi added."""
    valid = cols[None, :] < kl
    pos = rows[:, None] + offset  # the key position of each query row
    if CAUSAL:
        valid = valid & (cols[None, :] <= pos)
    if WINDOW:
        valid = valid & ((wl < 0) | (cols[None, :] >= pos - wl)) & ((wr < 0) | (cols[None, :] <= pos + wr))
    if ALIBI:
        slope = tl.load(AL + b * sab + h) * 1.4426950408889634
        s = s - slope * tl.abs(pos - cols[None, :]).to(tl.float32)
    if MASK_KIND != 0:
        # indices clamped into the mask instead of a load predicate (fewer live registers);
        # the entries read for rows/keys out of range are never used
        r = tl.minimum(rows, Lq - 1)
        c = tl.minimum(cols, Lk - 1)
        ptrs = M + b * smb + h * smh + r[:, None] * smm + c[None, :] * smn
        if MASK_KIND == 1:
            valid = valid & (tl.load(ptrs) != 0)
        else:
            s = s + tl.load(ptrs).to(tl.float32) * 1.4426950408889634
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _key_range(pid_m, Lk, kl, offset, wl, wr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[start, end) of the keys any query of block pid_m can see, start a multiple of BLOCK_N."""
    kend = tl.minimum(_causal_key_end(pid_m, Lk, offset, CAUSAL, BLOCK_M), kl)
    start = 0
    if WINDOW:
        if wr >= 0:
            kend = tl.minimum(kend, tl.maximum(0, (pid_m + 1) * BLOCK_M + offset + wr))
        if wl >= 0:
            start = tl.maximum(0, pid_m * BLOCK_M + offset - wl) // BLOCK_N * BLOCK_N
    return start, kend


@triton.jit
def _sequence(CUQ, CUK, b, h, bh, Lq, Lk, offset, VARLEN: tl.constexpr):
    """(q0, lq, k0, lk, offset, row0) of sequence b: its first query row and query count, its
    first key row and key count, the causal offset, and the row of its query 0 in the LSE /
    delta / dropout numbering. A batch: (0, Lq, 0, Lk, offset, bh * Lq). Packed (VARLEN, Lq
    the total query rows, cu_seqlens at CUQ / CUK): bottom-right on its own lengths, LSE
    (H, total_q), dropout counters of a (1, H, total_q, Lk = longest) batch."""
    if VARLEN:
        q0 = tl.load(CUQ + b)
        k0 = tl.load(CUK + b)
        lq = tl.load(CUQ + b + 1) - q0
        lk = tl.load(CUK + b + 1) - k0
        return q0, lq, k0, lk, lk - lq, h.to(tl.int64) * Lq + q0
    return 0, Lq, 0, Lk, offset, bh.to(tl.int64) * Lq


@triton.jit
def _dropout_keep(row0, rows, start_n, Lk, seed, rng_offset, threshold,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Whether dropout keeps each score of the tile rows x [start_n, start_n + BLOCK_N):
    key j of row r = row0 + i (bh * Lq + i in a batch) uses word j % 4 of Philox block
    rng_offset + r * ceil(Lk / 4) + j // 4. One block per four keys: the four words of a
    (BLOCK_M, BLOCK_N / 4) tile of blocks are interleaved into the (BLOCK_M, BLOCK_N) tile."""
    row_block = (row0 + rows) * ((Lk + 3) // 4) + rng_offset
    blocks = row_block[:, None] + (start_n // 4 + tl.arange(0, BLOCK_N // 4))[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, blocks)
    # join(join(r0, r2), join(r1, r3))[m, c, a, b] = r_(2a + b): lane 2a + b of block c
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_N))
    return words.to(tl.int64) >= threshold


@triton.jit
def _query_side(Q, DO, LSE, DELTA, q_off, do_off, sqm, sdm, row0, rows, Lq, offs_d, D, offs_dv, DV):
    """q, dO, the LSE in base 2 and delta of one query block, as both backward kernels use them.

    A row that sees no key has LSE -inf; +inf in its place makes exp2(s - lse) zero there.
    """
    q = _load_rows(Q + q_off, rows, Lq, sqm, offs_d, D)
    do = _load_rows(DO + do_off, rows, Lq, sdm, offs_dv, DV)
    lse = tl.load(LSE + row0 + rows, mask=rows < Lq, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + row0 + rows, mask=rows < Lq, other=0.0)
    return q, do, lse2, delta


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, M, KL,
              sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, smb, smh, smm, smn,
              H, G, Lq, Lk, D, DV, offset, qk_scale, seed, rng_offset, threshold, drop_scale,
              AL, sab, softcap, wl, wr, CUQ, CUK,
              CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, F32: tl.constexpr,
              MASK_KIND: tl.constexpr = 0, HAS_LENGTHS: tl.constexpr = False, DROPOUT: tl.constexpr = False,
              SOFTCAP: tl.constexpr = False, WINDOW: tl.constexpr = False, ALIBI: tl.constexpr = False,
              VARLEN: tl.constexpr = False):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    q0, lq, k0, lk, offset, row0 = _sequence(CUQ, CUK, b, h, bh, Lq, Lk, offset, VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if VARLEN:  # sequence b's rows of the packed tensors (the batch strides are 0)
        Q = Q + q0 * sqm
        K = K + k0 * skn
        V = V + k0 * svn
        O = O + q0 * som
    q = _load_rows(Q + b * sqb + h * sqh, offs_m, lq, sqm, offs_d, D)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    kl = _key_limit(KL, b, lk, HAS_LENGTHS)
    kstart, kend = _key_range(pid_m, lk, kl, offset, wl, wr, CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
    if VARLEN:
        if pid_m * BLOCK_M >= lq:  # a block past a short packed sequence: nothing to compute
            kend = 0
    for start_n in range(kstart, kend, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows_t(k_base, cols, lk, skn, offs_d, D)  # (BLOCK_D, BLOCK_N)
        if F32:
            s = tl.dot(q, k, input_precision=F32_PRECISION)
        else:
            s = tl.dot(q, k)
        s, _ = _logits(s, qk_scale, softcap, SOFTCAP)
        s = _mask_scores(s, b, h, offs_m, cols, lq, lk, kl, offset, M, smb, smh, smm, smn,
                         wl, wr, AL, sab, CAUSAL, MASK_KIND, WINDOW, ALIBI)  # base-2 logits
        # NaN in a score must reach the row: the running max propagates it explicitly (and
        # exp2(NaN - m) carries it into l and acc even where a max reduction drops it)
        m_new = tl.maximum(m_i, tl.max(s, 1), propagate_nan=tl.PropagateNan.ALL)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:  # the sum above is over all keys; only the output drops
            keep = _dropout_keep(row0, offs_m, start_n, Lk, seed, rng_offset, threshold, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p * drop_scale, 0.0)
        v = _load_rows(v_base, cols, lk, svn, offs_dv, DV)
        acc = acc * alpha[:, None]
        if F32:
            acc += tl.dot(p.to(v.dtype), v, input_precision=F32_PRECISION)
        else:
            acc += tl.dot(p.to(v.dtype), v)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_ptrs = O + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < lq) & (offs_dv[None, :] < DV))
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(LSE + row0 + offs_m, lse, mask=offs_m < lq)


@triton.jit
def _attn_bwd_preprocess(O, DO, DLSE, DELTA, sob, soh, som, sdb, sdh, sdm, H, Lq, DV,
                         HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    o = _load_rows(O + b * sob + h * soh, offs_m, Lq, som, offs_dv, DV)
    do = _load_rows(DO + b * sdb + h * sdh, offs_m, Lq, sdm, offs_dv, DV)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    tl.store(DELTA + bh * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _probs_and_dscores(q, k, v, do, lse2, delta, b, h, row0, rows, cols, Lq, Lk, kl, offset, qk_scale,
                       M, smb, smh, smm, smn, seed, rng_offset, threshold, drop_scale, start_n, AL, sab, softcap, wl, wr,
                       drop_len,
                       CAUSAL: tl.constexpr, F32: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
                       SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, ALIBI: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For one tile: the probabilities as the output used them (P, or P * Z with the dropout
    multipliers Z) and dS = P * (dO V^T * Z - delta), times the cap's slope 1 - tanh^2 with
    SOFTCAP (dS is then the gradient of the scores before the cap)."""
    if F32:
        s = tl.dot(q, k, input_precision=F32_PRECISION)
    else:
        s = tl.dot(q, k)
    s, t = _logits(s, qk_scale, softcap, SOFTCAP)
    s = _mask_scores(s, b, h, rows, cols, Lq, Lk, kl, offset, M, smb, smh, smm, smn,
                     wl, wr, AL, sab, CAUSAL, MASK_KIND, WINDOW, ALIBI)
    p = tl.exp2(s - lse2[:, None])  # exactly 0 where s = -inf
    if F32:
        dp = tl.dot(do, v, input_precision=F32_PRECISION)
    else:
        dp = tl.dot(do, v)
    if DROPOUT:
        keep = _dropout_keep(row0, rows, start_n, drop_len, seed, rng_offset, threshold, BLOCK_M, BLOCK_N)
        z = tl.where(keep, drop_scale, 0.0)
        p_used, ds = p * z, p * (dp * z - delta[:, None])
    else:
        p_used, ds = p, p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return p_used, ds


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV_, M, KL,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm,
                   sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, smb, smh, smm, smn,
                   H, Hk, G, Lq, Lk, D, DV, offset, qk_scale, scale, seed, rng_offset, threshold, drop_scale,
                   AL, sab, softcap, wl, wr, CUQ, CUK,
                   CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, F32: tl.constexpr,
                   MASK_KIND: tl.constexpr = 0, HAS_LENGTHS: tl.constexpr = False, DROPOUT: tl.constexpr = False,
                   SOFTCAP: tl.constexpr = False, WINDOW: tl.constexpr = False, ALIBI: tl.constexpr = False,
                   VARLEN: tl.constexpr = False):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // Hk
    hk = bhk % Hk
    q0, lq, k0, lk, offset, _ = _sequence(CUQ, CUK, b, hk, b * H, Lq, Lk, offset, VARLEN)  # row0: per head below
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_mb = tl.arange(0, BLOCK_M)
    if VARLEN:  # sequence b's rows of the packed tensors (the batch strides are 0)
        Q = Q + q0 * sqm
        DO = DO + q0 * sdm
        K = K + k0 * skn
        V = V + k0 * svn
        DK = DK + k0 * sdkn
        DV_ = DV_ + k0 * sdvn
    k = _load_rows_t(K + b * skb + hk * skh, cols, lk, skn, offs_d, D)        # (BLOCK_D, BLOCK_N)
    v = _load_rows_t(V + b * svb + hk * svh, cols, lk, svn, offs_dv, DV)      # (BLOCK_DV, BLOCK_N)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    start_m = 0
    if CAUSAL:  # the first query that sees key pid_n * BLOCK_N: i + offset >= j
        start_m = tl.maximum(0, pid_n * BLOCK_N - offset) // BLOCK_M * BLOCK_M
    kl = _key_limit(KL, b, lk, HAS_LENGTHS)
    end_m = lq
    if VARLEN:  # a block past a short packed sequence: no work
        end_m = tl.where(pid_n * BLOCK_N < lk, lq, 0)
    if HAS_LENGTHS:  # a block of padding keys: zero gradients, no work
        end_m = tl.where(pid_n * BLOCK_N < kl, lq, 0)
    if WINDOW:  # only the query blocks whose windows reach this key block
        if wr >= 0:  # the first query with j <= i + offset + wr
            start_m = tl.maximum(start_m, tl.maximum(0, pid_n * BLOCK_N - offset - wr) // BLOCK_M * BLOCK_M)
        if wl >= 0:  # one past the last query with j >= i + offset - wl, j the block's last key
            end_m = tl.minimum(end_m, tl.maximum(0, (pid_n + 1) * BLOCK_N - 1 - offset + wl + 1))
    for g in range(0, G):
        h = hk * G + g
        if VARLEN:
            row0 = h.to(tl.int64) * Lq + q0
        else:
            row0 = (b * H + h).to(tl.int64) * Lq
        for m0 in range(start_m, end_m, BLOCK_M):
            rows = m0 + offs_mb
            q, do, lse2, delta = _query_side(Q, DO, LSE, DELTA, b * sqb + h * sqh, b * sdb + h * sdh, sqm, sdm,
                                             row0, rows, lq, offs_d, D, offs_dv, DV)
            p, ds = _probs_and_dscores(q, k, v, do, lse2, delta, b, h, row0, rows, cols, lq, lk, kl, offset, qk_scale,
                                       M, smb, smh, smm, smn, seed, rng_offset, threshold, drop_scale,
                                       pid_n * BLOCK_N, AL, sab, softcap, wl, wr, Lk, CAUSAL, F32, MASK_KIND, DROPOUT,
                                       SOFTCAP, WINDOW, ALIBI, BLOCK_M, BLOCK_N)
            if F32:
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=F32_PRECISION)
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=F32_PRECISION)
            else:
                dv += tl.dot(tl.trans(p.to(do.dtype)), do)
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    mask_n = cols[:, None] < lk
    tl.store(DK + b * sdkb + hk * sdkh + cols[:, None] * sdkn + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=mask_n & (offs_d[None, :] < D))
    tl.store(DV_ + b * sdvb + hk * sdvh + cols[:, None] * sdvn + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
             mask=mask_n & (offs_dv[None, :] < DV))


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, M, KL,
                 sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm, sdqb, sdqh, sdqm, smb, smh, smm, smn,
                 H, G, Lq, Lk, D, DV, offset, qk_scale, scale, seed, rng_offset, threshold, drop_scale,
                 AL, sab, softcap, wl, wr, CUQ, CUK,
                 CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, F32: tl.constexpr,
                 MASK_KIND: tl.constexpr = 0, HAS_LENGTHS: tl.constexpr = False, DROPOUT: tl.constexpr = False,
                 SOFTCAP: tl.constexpr = False, WINDOW: tl.constexpr = False, ALIBI: tl.constexpr = False,
                 VARLEN: tl.constexpr = False):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    q0, lq, k0, lk, offset, row0 = _sequence(CUQ, CUK, b, h, bh, Lq, Lk, offset, VARLEN)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if VARLEN:  # sequence b's rows of the packed tensors (the batch strides are 0)
        Q = Q + q0 * sqm
        DO = DO + q0 * sdm
        DQ = DQ + q0 * sdqm
        K = K + k0 * skn
        V = V + k0 * svn
    q, do, lse2, delta = _query_side(Q, DO, LSE, DELTA, b * sqb + h * sqh, b * sdb + h * sdh, sqm, sdm,
                                     row0, rows, lq, offs_d, D, offs_dv, DV)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    kl = _key_limit(KL, b, lk, HAS_LENGTHS)
    kstart, kend = _key_range(pid_m, lk, kl, offset, wl, wr, CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
    if VARLEN:
        if pid_m * BLOCK_M >= lq:  # a block past a short packed sequence: nothing to compute
            kend = 0
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    for start_n in range(kstart, kend, BLOCK_N):
        cols = start_n + offs_n
        kt = _load_rows_t(k_base, cols, lk, skn, offs_d, D)     # (BLOCK_D, BLOCK_N)
        vt = _load_rows_t(v_base, cols, lk, svn, offs_dv, DV)   # (BLOCK_DV, BLOCK_N)
        p, ds = _probs_and_dscores(q, kt, vt, do, lse2, delta, b, h, row0, rows, cols, lq, lk, kl, offset, qk_scale,
                                   M, smb, smh, smm, smn, seed, rng_offset, threshold, drop_scale,
                                   start_n, AL, sab, softcap, wl, wr, Lk, CAUSAL, F32, MASK_KIND, DROPOUT,
                                   SOFTCAP, WINDOW, ALIBI, BLOCK_M, BLOCK_N)
        if F32:
            dq += tl.dot(ds.to(q.dtype), tl.trans(kt), input_precision=F32_PRECISION)
        else:
            dq += tl.dot(ds.to(q.dtype), tl.trans(kt))
    tl.store(DQ + b * sdqb + h * sdqh + rows[:, None] * sdqm + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=(rows[:, None] < lq) & (offs_d[None, :] < D))


# --- configs ---------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages). The first entry of each list is the fixed
# config used without a GPU driver. Every entry is checked by kernels/aot.py (run by
# tests/kernels/test_aot_compile.py): compiles for sm_80 and sm_90, fits shared memory,
# no register spills, wgmma on sm_90.

HEAD_DIM_CLASSES = (64, 128, 256)

# CONFIGS[kind][arch][head-dim class] for float16 / bfloat16; kind "fwd" for the forward
# kernel, "bwd" for both backward kernels, "*_masked" when a mask, key lengths or dropout
# is on (dK/dV and dQ keep more tiles live, so they need
# smaller blocks or more warps). Ampere (sm_80): 163 KiB shared memory per block, mma.sync.
# Hopper (sm_90): 227 KiB, wgmma (a warpgroup of 4 warps, M >= 64). Configs that spilled in
# kernels/aot.py were removed. One exception to "wgmma on sm_90" is kept and tested as
# such (NO_WGMMA): the backward at head dim 256, where every tile large enough for wgmma
# spills registers and (32, 32, 8, 1) with mma.sync does not.
CONFIGS = {
    "fwd": {
        80: {64: [(64, 64, 4, 2)], 128: [(64, 64, 4, 2), (64, 32, 4, 3)],
             256: [(32, 32, 4, 1), (64, 32, 8, 1)]},
        90: {64: [(64, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2)],
             128: [(64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 8, 3)], 256: [(64, 64, 8, 1)]},
    },
    "bwd": {
        80: {64: [(64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2)], 128: [(32, 32, 4, 2)], 256: [(32, 32, 8, 1)]},
        90: {64: [(64, 64, 4, 2), (128, 64, 8, 3)], 128: [(64, 64, 8, 2)], 256: [(32, 32, 8, 1)]},
    },
    # With any optional feature on (attn_mask, key lengths, dropout, softcap, window, ALiBi):
    # the mask tile and the Philox words are live next to the score tile, and the plain
    # configs spill. These were chosen with kernels/aot.py at the heaviest variants (mask,
    # lengths and dropout on, boolean and additive masks; softcap, window and ALiBi with
    # lengths and dropout); a narrower BLOCK_N or more warps keeps them spill-free.
    "fwd_masked": {
        80: {64: [(64, 32, 8, 2), (32, 32, 4, 2)], 128: [(32, 32, 8, 1), (64, 16, 8, 1)],
             256: [(64, 32, 8, 2), (16, 16, 4, 1)]},
        90: {64: [(64, 32, 8, 2), (128, 32, 8, 2)], 128: [(64, 32, 8, 2), (64, 16, 8, 1)], 256: [(64, 16, 8, 1)]},
    },
    "bwd_masked": {
        80: {64: [(32, 32, 4, 2), (64, 32, 8, 2)], 128: [(32, 32, 8, 1)], 256: [(16, 16, 4, 1)]},
        90: {64: [(64, 32, 8, 2), (64, 32, 4, 2)], 128: [(64, 16, 8, 1)], 256: [(16, 16, 8, 1)]},
    },
}
# float32 inputs ("*_f32", with or without the optional features): the products are fp32
# FMAs (F32_PRECISION), which keep more of each tile in registers than the fp16 tensor-core
# products, so the tiles are small. Each entry compiles without spills with every feature
# off and on (boolean and additive masks). No wgmma: the products do not use tensor cores.
CONFIGS["fwd_f32"] = {
    80: {64: [(32, 32, 8, 1), (32, 32, 4, 1)], 128: [(32, 32, 8, 1), (32, 16, 4, 1)],
         256: [(32, 32, 8, 1), (16, 32, 8, 1)]},
    90: {64: [(32, 32, 8, 1), (32, 32, 4, 1)], 128: [(32, 16, 8, 1)],
         256: [(16, 32, 8, 1), (32, 16, 8, 1)]},
}
CONFIGS["bwd_f32"] = {
    80: {64: [(16, 16, 4, 1)], 128: [(16, 16, 8, 2)], 256: [(32, 16, 16, 1)]},
    90: {64: [(32, 16, 8, 1)], 128: [(32, 16, 8, 1)], 256: [(32, 16, 16, 1)]},
}
NO_WGMMA = {("bwd", 90, 256), ("bwd_masked", 90, 256)} | {(k, 90, d) for k in ("fwd_f32", "bwd_f32")
                                                           for d in HEAD_DIM_CLASSES}


def head_dim_class(d: int) -> int:
    for c in HEAD_DIM_CLASSES:
        if d <= c:
            return c
    raise ValueError(f"head dim {d} is above {HEAD_DIM_CLASSES[-1]}")


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _config_kind(kernel: str, dtype: torch.dtype, flags: dict) -> str:
    """The CONFIGS entry for a launch: fwd/bwd, then _f32 for float32 inputs, else _masked
    when any optional feature is on."""
    base = "fwd" if kernel == "fwd" else "bwd"
    if dtype == torch.float32:
        return base + "_f32"
    return base + ("_masked" if _any(flags) else "")


def _configs_for(kind: str, device: torch.device, d: int):
    """kind: a key of CONFIGS."""
    if device.type != "cuda":
        return CONFIGS[kind][90][head_dim_class(d)][:1]
    major, _ = torch.cuda.get_device_capability(device)
    return CONFIGS[kind][90 if major >= 9 else 80][head_dim_class(d)]


_TUNED: dict = {}


def _best_config(kernel: str, device, key: tuple, run, kind: str) -> tuple:
    """The fastest config of CONFIGS[kind] for ``key`` (timed once per key on a GPU), or the
    fixed one."""
    configs = _configs_for(kind, device, key[0])
    if device.type != "cuda" or len(configs) == 1:
        return configs[0]
    k = (kernel, kind, torch.cuda.get_device_capability(device)) + key
    if k not in _TUNED:
        times = []
        for cfg in configs:
            try:
                times.append((triton.testing.do_bench(lambda: run(cfg), warmup=5, rep=20), cfg))
            except Exception:  # a config the device cannot run (resources): skip it
                continue
        _TUNED[k] = min(times)[1]
    return _TUNED[k]


def _tune_key(q, k, v, causal):
    return (max(q.shape[-1], v.shape[-1]), bool(causal), q.dtype,
            triton.next_power_of_2(q.shape[2]), triton.next_power_of_2(k.shape[2]))


# --- launchers -------------------------------------------------------------------------------

def _prep(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _extras(q, k, attn_mask, key_lengths, dropout_p, rng_state, softcap=0.0, window_left=-1, window_right=-1,
            alibi_slopes=None) -> tuple[list, list, list, dict]:
    """The kernels' optional arguments: pointers (M, KL), mask strides, the dropout scalars
    followed by (AL, sab, softcap, wl, wr, CUQ, CUK), and the flags."""
    B, H, Lq, Lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    mask_kind, strides = 0, [0, 0, 0, 0]
    if attn_mask is not None:
        assert attn_mask.dim() == 4 and all(a in (1, f) for a, f in zip(attn_mask.shape, (B, H, Lq, Lk)))
        mask_kind = 1 if attn_mask.dtype == torch.bool else 2
        strides = [0 if n == 1 else st for n, st in zip(attn_mask.shape, attn_mask.stride())]
    seed = offset = threshold = 0
    drop_scale = 1.0
    if dropout_p > 0.0:
        from seqkernels.reference.philox import dropout_threshold

        seed, offset = (int(x) for x in rng_state.tolist())
        threshold, drop_scale = dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)
    pointers = [attn_mask if attn_mask is not None else q, key_lengths if key_lengths is not None else q]
    window = window_left >= 0 or window_right >= 0
    flags = dict(MASK_KIND=mask_kind, HAS_LENGTHS=key_lengths is not None, DROPOUT=dropout_p > 0.0,
                 SOFTCAP=softcap > 0.0, WINDOW=window, ALIBI=alibi_slopes is not None)
    al = alibi_slopes.contiguous() if alibi_slopes is not None else q  # q: a pointer ALIBI=False never reads
    sab = alibi_slopes.shape[1] if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0
    scalars = [seed, offset, threshold, drop_scale, al, sab, float(softcap) if softcap > 0.0 else 1.0,
               int(window_left), int(window_right), q, q]  # CUQ, CUK: unused without VARLEN
    return pointers, strides, scalars, flags


def _any(flags: dict) -> bool:
    return any(bool(v) for v in flags.values())


def forward(q, k, v, causal: bool, bottom_right: bool, scale: float, attn_mask=None, key_lengths=None,
            dropout_p: float = 0.0, rng_state=None, softcap: float = 0.0, window_left: int = -1,
            window_right: int = -1, alibi_slopes=None):
    """Returns (out (B, H, Lq, Dv) in q's dtype, lse (B, H, Lq) fp32).

    attn_mask: 4-D, each dim 1 or full, bool or additive; key_lengths: (B,) int64;
    dropout_p with rng_state = [seed, offset] (a CPU int64 tensor); softcap > 0; the window
    (-1 = unbounded); alibi_slopes fp32 (H,) or (B, H)."""
    from seqkernels.testing import poisoned_empty

    q, k, v = _prep(q), _prep(k), _prep(v)
    B, H, Lq, D = q.shape
    Hk, Lk, DV = k.shape[1], k.shape[2], v.shape[3]
    out = poisoned_empty(B, H, Lq, DV, dtype=q.dtype, device=q.device)
    lse = poisoned_empty(B, H, Lq, dtype=torch.float32, device=q.device)
    offset = Lk - Lq if bottom_right else 0
    f32 = q.dtype == torch.float32
    pointers, mstrides, drop, flags = _extras(q, k, attn_mask, key_lengths, dropout_p, rng_state, softcap,
                                              window_left, window_right, alibi_slopes)

    def run(cfg):
        bm, bn, warps, stages = cfg
        grid = (triton.cdiv(Lq, bm), B * H)
        _attn_fwd[grid](q, k, v, out, lse, *pointers, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                        *out.stride()[:3], *mstrides, H, H // Hk, Lq, Lk, D, DV, offset, scale * LOG2E, *drop,
                        CAUSAL=bool(causal), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV),
                        F32=f32, num_warps=warps, num_stages=stages, **flags)

    run(_best_config("fwd", q.device, _tune_key(q, k, v, causal) + tuple(flags.values()), run,
                     _config_kind("fwd", q.dtype, flags)))
    return out, lse


def backward(grad_out, grad_lse, q, k, v, out, lse, causal: bool, bottom_right: bool, scale: float,
             attn_mask=None, key_lengths=None, dropout_p: float = 0.0, rng_state=None, softcap: float = 0.0,
             window_left: int = -1, window_right: int = -1, alibi_slopes=None):
    """Returns (dq, dk, dv) in the dtypes of q, k, v. The optional arguments must be the
    forward's."""
    from seqkernels.testing import poisoned_empty

    q, k, v, out, do = _prep(q), _prep(k), _prep(v), _prep(out), _prep(grad_out.to(q.dtype))
    B, H, Lq, D = q.shape
    Hk, Lk, DV = k.shape[1], k.shape[2], v.shape[3]
    lse = lse.to(torch.float32).contiguous()
    dlse = None if grad_lse is None else grad_lse.to(torch.float32).contiguous()
    delta = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    pre_m = 64
    _attn_bwd_preprocess[(triton.cdiv(Lq, pre_m), B * H)](
        out, do, dlse if dlse is not None else delta, delta, *out.stride()[:3], *do.stride()[:3], H, Lq, DV,
        HAS_DLSE=dlse is not None, BLOCK_M=pre_m, BLOCK_DV=_pow2(DV))
    dq = poisoned_empty(q.shape, dtype=q.dtype, device=q.device)
    dk = poisoned_empty(k.shape, dtype=k.dtype, device=k.device)
    dv = poisoned_empty(v.shape, dtype=v.dtype, device=v.device)
    offset = Lk - Lq if bottom_right else 0
    f32 = q.dtype == torch.float32
    pointers, mstrides, drop, flags = _extras(q, k, attn_mask, key_lengths, dropout_p, rng_state, softcap,
                                              window_left, window_right, alibi_slopes)
    common = dict(CAUSAL=bool(causal), BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV), F32=f32, **flags)
    key = _tune_key(q, k, v, causal) + tuple(flags.values())

    def run_dkdv(cfg):
        bm, bn, warps, stages = cfg
        _attn_bwd_dkdv[(triton.cdiv(Lk, bn), B * Hk)](
            q, k, v, do, lse, delta, dk, dv, *pointers, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], *mstrides, H, Hk, H // Hk, Lq, Lk, D, DV, offset,
            scale * LOG2E, scale, *drop,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **common)

    def run_dq(cfg):
        bm, bn, warps, stages = cfg
        _attn_bwd_dq[(triton.cdiv(Lq, bm), B * H)](
            q, k, v, do, lse, delta, dq, *pointers, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *do.stride()[:3], *dq.stride()[:3], *mstrides, H, H // Hk, Lq, Lk, D, DV, offset, scale * LOG2E, scale,
            *drop,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **common)

    kind = _config_kind("bwd", q.dtype, flags)
    run_dkdv(_best_config("dkdv", q.device, key, run_dkdv, kind))
    run_dq(_best_config("dq", q.device, key, run_dq, kind))
    return dq, dk, dv



# --- packed batches (varlen) -------------------------------------------------------------------
# The same kernels with VARLEN: program (query block, sequence x head) reads sequence b's
# rows cu_seqlens[b] .. of the packed (total, heads, head_dim) tensors; programs past a short
# sequence's end do nothing. The grid spans the longest sequence.

def _varlen_extras(q, cu_q, cu_k, dropout_p, rng_state, softcap, window_left, window_right, alibi_slopes):
    pointers, mstrides, scalars, flags = _extras(q, q, None, None, dropout_p, rng_state, softcap, window_left,
                                                 window_right, alibi_slopes)
    scalars[-2:] = [cu_q.contiguous(), cu_k.contiguous()]
    flags["VARLEN"] = True
    return pointers, mstrides, scalars, flags


def _packed_strides(t):
    """(sequence, head, row) strides of a packed (total, heads, X) tensor: rows start at
    cu_seqlens, so the sequence stride is 0."""
    return 0, t.stride(1), t.stride(0)


def forward_varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float, dropout_p: float = 0.0,
                   rng_state=None, softcap: float = 0.0, window_left: int = -1, window_right: int = -1,
                   alibi_slopes=None):
    """Packed q (total_q, H, D), k (total_k, Hk, D), v (total_k, Hk, Dv), int32 cu_seqlens;
    returns (out (total_q, H, Dv), lse (H, total_q) fp32). Causal bottom-right per sequence."""
    from seqkernels.testing import poisoned_empty

    q, k, v = _prep(q), _prep(k), _prep(v)
    T, H, D = q.shape
    Hk, DV = k.shape[1], v.shape[2]
    B = cu_q.shape[0] - 1
    out = poisoned_empty(T, H, DV, dtype=q.dtype, device=q.device)
    lse = poisoned_empty(H, T, dtype=torch.float32, device=q.device)
    if T == 0 or B == 0 or max_q == 0:
        return out, lse.fill_(float("-inf"))
    pointers, mstrides, drop, flags = _varlen_extras(q, cu_q, cu_k, dropout_p, rng_state, softcap, window_left,
                                                     window_right, alibi_slopes)

    def run(cfg):
        bm, bn, warps, stages = cfg
        _attn_fwd[(triton.cdiv(max_q, bm), B * H)](
            q, k, v, out, lse, *pointers, *_packed_strides(q), *_packed_strides(k), *_packed_strides(v),
            *_packed_strides(out), *mstrides, H, H // Hk, T, max(max_k, 1), D, DV, 0, scale * LOG2E, *drop,
            CAUSAL=bool(causal), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV), F32=q.dtype == torch.float32,
            num_warps=warps, num_stages=stages, **flags)

    key = (max(D, DV), bool(causal), q.dtype, triton.next_power_of_2(max_q), triton.next_power_of_2(max(max_k, 1)))
    run(_best_config("fwd", q.device, key + tuple(flags.values()), run, _config_kind("fwd", q.dtype, flags)))
    return out, lse


def backward_varlen(grad_out, grad_lse, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, causal: bool,
                    scale: float, dropout_p: float = 0.0, rng_state=None, softcap: float = 0.0, window_left: int = -1,
                    window_right: int = -1, alibi_slopes=None):
    """Returns (dq, dk, dv) of forward_varlen; the optional arguments must be the forward's."""
    from seqkernels.testing import poisoned_empty

    q, k, v, do = _prep(q), _prep(k), _prep(v), _prep(grad_out.to(q.dtype))
    T, H, D = q.shape
    Tk, Hk, DV = k.shape[0], k.shape[1], v.shape[2]
    B = cu_q.shape[0] - 1
    dq = poisoned_empty(q.shape, dtype=q.dtype, device=q.device)
    dk = poisoned_empty(k.shape, dtype=k.dtype, device=k.device)
    dv = poisoned_empty(v.shape, dtype=v.dtype, device=v.device)
    if T == 0 or Tk == 0 or B == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    # delta in the LSE's (H, total_q) layout (one O(n d) pass in torch)
    delta = (do.float() * out.float()).sum(-1).t()
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    delta = delta.contiguous()
    lse = lse.to(torch.float32).contiguous()
    pointers, mstrides, drop, flags = _varlen_extras(q, cu_q, cu_k, dropout_p, rng_state, softcap, window_left,
                                                     window_right, alibi_slopes)
    common = dict(CAUSAL=bool(causal), BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV), F32=q.dtype == torch.float32, **flags)
    key = (max(D, DV), bool(causal), q.dtype, triton.next_power_of_2(max(max_q, 1)),
           triton.next_power_of_2(max(max_k, 1))) + tuple(flags.values())
    mk = max(max_k, 1)

    def run_dkdv(cfg):
        bm, bn, warps, stages = cfg
        _attn_bwd_dkdv[(triton.cdiv(mk, bn), B * Hk)](
            q, k, v, do, lse, delta, dk, dv, *pointers, *_packed_strides(q), *_packed_strides(k), *_packed_strides(v),
            *_packed_strides(do), *_packed_strides(dk), *_packed_strides(dv), *mstrides, H, Hk, H // Hk, T, mk, D, DV,
            0, scale * LOG2E, scale, *drop, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **common)

    def run_dq(cfg):
        bm, bn, warps, stages = cfg
        _attn_bwd_dq[(triton.cdiv(max(max_q, 1), bm), B * H)](
            q, k, v, do, lse, delta, dq, *pointers, *_packed_strides(q), *_packed_strides(k), *_packed_strides(v),
            *_packed_strides(do), *_packed_strides(dq), *mstrides, H, H // Hk, T, mk, D, DV, 0, scale * LOG2E, scale,
            *drop, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **common)

    kind = _config_kind("bwd", q.dtype, flags)
    run_dkdv(_best_config("dkdv", q.device, key, run_dkdv, kind))
    run_dq(_best_config("dq", q.device, key, run_dq, kind))
    return dq, dk, dv
