"""Flash-decoding in Triton: attention of a few query rows against a long KV cache.

Two kernels, as in flash-decoding (split-K):

    _decode_split    one program per (key split, batch x kv head): the G query heads of the
                     group times the Lq query rows are the R rows of one tile, so each K/V
                     row is read once per group; it streams its share of the keys with an
                     online softmax and writes a partial (row max, row sum, output rows)
    _decode_combine  one program per (batch x kv head, row): merges the splits in order

Keys are found through the cache layout: contiguous (B, Hk, Lmax, D), or paged pools
(num_blocks, Hk, block_size, D) with a block table (B, max_blocks) (PAGED). Sequence b has
lens[b] keys; query i of a sequence sits at key position i + lens[b] - Lq and sees key
j < lens[b], with CAUSAL j <= that position. Optional, as in the flash kernels
(kernels/flash_attention.py): SOFTCAP, WINDOW (keys before the first row's window are never
read) and ALIBI, on those positions. fp16 / bf16 / fp32 caches, fp32 accumulation and
statistics.

The CUDA body of ``seqkernels::flash_attention_kvcache`` (``kvcache_attention``) appends
the new keys with torch indexing, then runs the two kernels. Without a GPU they run under
Triton's interpreter on CPU tensors (tests); every config is compiled for sm_80 and sm_90
by :func:`aot_report`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .flash_attention import _logits

LOG2E = 1.4426950408889634
# Query rows per program: the G * Lq rows of a K/V head's group, in tiles of 16 (tl.dot's
# smallest M); decoding (G * Lq <= 16) reads each K/V row once per group.
BLOCK_R = 16
# A combine program merges at most this many splits.
MAX_SPLITS = 64

# (BLOCK_N, num_warps, num_stages) by head-dim class; the first entry is the interpreter's.
# The K/V tiles are gathered through per-element row pointers (the paged layout needs them),
# which cost registers: the configs are the ones that compile without spills (aot_report).
CONFIGS = {"half": {64: [(64, 4, 1), (32, 8, 2)], 128: [(32, 4, 1), (64, 8, 1)], 256: [(16, 4, 1), (32, 8, 1)]},
           "f32": {64: [(64, 8, 1), (32, 8, 1)], 128: [(32, 4, 1), (32, 8, 1)], 256: [(16, 8, 1), (32, 8, 1)]}}


@triton.jit
def _decode_split(Q, KC, VC, LENS, BT, PM, PL, PO, AL,
                  H, Hk, G, Lq, D, DV, rows_per_block, max_blocks, chunk, n_splits, qk_scale, softcap, wl, wr, sab,
                  CAUSAL: tl.constexpr, PAGED: tl.constexpr, F32: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  SOFTCAP: tl.constexpr = False, WINDOW: tl.constexpr = False, ALIBI: tl.constexpr = False):
    split = tl.program_id(0)
    bhk = tl.program_id(1)
    row_block = tl.program_id(2)
    b = bhk // Hk
    hk = bhk % Hk
    R = G * Lq
    R_pad = tl.num_programs(2) * BLOCK_R
    rows = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # row r of the tile: query head hk * G + r // Lq, query r % Lq (q is (B, H, Lq, D) contiguous)
    q_row = (b * H + hk * G + rows // Lq) * Lq + rows % Lq
    q = tl.load(Q + q_row[:, None] * D + offs_d[None, :], mask=(rows[:, None] < R) & (offs_d[None, :] < D), other=0.0)
    n_keys = tl.load(LENS + b).to(tl.int32)
    i = rows % Lq
    qpos = i + n_keys - Lq  # each row's key position
    row_end = tl.where(rows < R, n_keys, 0)
    if CAUSAL:
        row_end = tl.minimum(row_end, tl.maximum(qpos + 1, 0))
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n_keys)
    row_begin = tl.zeros([BLOCK_R], dtype=tl.int32)
    if WINDOW:
        if wr >= 0:
            row_end = tl.minimum(row_end, tl.maximum(qpos + wr + 1, 0))
        if wl >= 0:
            row_begin = tl.maximum(qpos - wl, 0)
            lo = tl.maximum(lo, n_keys - Lq - wl)  # query 0's window starts first
    if ALIBI:
        slope = tl.load(AL + b * sab + hk * G + rows // Lq, mask=rows < R, other=0.0) * 1.4426950408889634
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < hi
        if PAGED:
            blk = tl.load(BT + b * max_blocks + pos // rows_per_block, mask=valid, other=0)
            kv_row = (blk * Hk + hk) * rows_per_block + pos % rows_per_block
        else:
            kv_row = (b * Hk + hk) * rows_per_block + pos
        kv_row = tl.where(valid, kv_row, 0).to(tl.int64)
        k = tl.load(KC + kv_row[None, :] * D + offs_d[:, None], mask=valid[None, :] & (offs_d[:, None] < D), other=0.0)
        if F32:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s, _ = _logits(s, qk_scale, softcap, SOFTCAP)
        if ALIBI:
            s = s - slope[:, None] * tl.abs(qpos[:, None] - pos[None, :]).to(tl.float32)
        seen = pos[None, :] < row_end[:, None]
        if WINDOW:
            seen = seen & (pos[None, :] >= row_begin[:, None])
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1), propagate_nan=tl.PropagateNan.ALL)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(VC + kv_row[:, None] * DV + offs_dv[None, :], mask=valid[:, None] & (offs_dv[None, :] < DV),
                    other=0.0)
        acc = acc * alpha[:, None]
        if F32:
            acc += tl.dot(p, v, input_precision="ieee")
        else:
            acc += tl.dot(p.to(v.dtype), v)
        m_i = m_new
    part = (bhk * n_splits + split) * R_pad + rows
    tl.store(PM + part, m_i)
    tl.store(PL + part, l_i)
    tl.store(PO + part[:, None] * BLOCK_DV + offs_dv[None, :], acc)


@triton.jit
def _decode_combine(PM, PL, PO, O, LSE, H, Hk, G, Lq, DV, n_splits, R_pad,
                    BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr):
    bhk = tl.program_id(0)
    r = tl.program_id(1)
    b = bhk // Hk
    hk = bhk % Hk
    splits = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = splits < n_splits
    part = (bhk * n_splits + splits) * R_pad + r
    m = tl.load(PM + part, mask=ok, other=float("-inf"))
    l = tl.load(PL + part, mask=ok, other=0.0)
    m_all = tl.max(m, 0)
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_safe))  # a split that saw nothing weighs 0
    o = tl.load(PO + part[:, None] * BLOCK_DV + offs_dv[None, :], mask=ok[:, None], other=0.0)
    l_all = tl.sum(l * w, 0)
    out = tl.sum(o * w[:, None], 0) / tl.where(l_all == 0.0, 1.0, l_all)
    h = hk * G + r // Lq
    i = r % Lq
    row = (b * H + h) * Lq + i
    tl.store(O + row * DV + offs_dv, out.to(O.dtype.element_ty), mask=offs_dv < DV)
    lse = tl.where(l_all == 0.0, float("-inf"), (m_all + tl.log2(tl.where(l_all == 0.0, 1.0, l_all))) * 0.6931471805599453)
    tl.store(LSE + row, lse)


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def head_dim_class(d: int) -> int:
    for c in sorted(CONFIGS["half"]):
        if d <= c:
            return c
    raise ValueError(f"head dim {d} is above {max(CONFIGS['half'])}")


def _splits(B: int, Hk: int, longest: int, block_n: int, device) -> int:
    """Enough splits for about two programs per SM (one without a GPU), each >= 4 blocks."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    want = max(1, (2 * sms + B * Hk - 1) // (B * Hk))
    return max(1, min(want, MAX_SPLITS, triton.cdiv(max(longest, 1), 4 * block_n)))


def attention(q, k_cache, v_cache, lens, block_table, causal: bool, scale: float, longest: int, softcap: float = 0.0,
              window_left: int = -1, window_right: int = -1, alibi_slopes=None):
    """out (B, H, Lq, Dv) in q's dtype and lse (B, H, Lq) fp32 of q against the first lens[b]
    keys of each sequence's cache; ``longest`` = max(lens), known to the caller."""
    from seqkernels.testing import poisoned_empty

    q = q.contiguous()
    B, H, Lq, D = q.shape
    Hk, DV = k_cache.shape[1], v_cache.shape[3]
    G = H // Hk
    R = G * Lq
    BLOCK_D, BLOCK_DV = _pow2(D), _pow2(DV)
    n_rb = triton.cdiv(R, BLOCK_R)  # the group's rows in tiles of BLOCK_R (one tile when G * Lq <= 16)
    R_pad = n_rb * BLOCK_R
    kind = "f32" if q.dtype == torch.float32 else "half"
    block_n, warps, stages = CONFIGS[kind][head_dim_class(max(D, DV))][0]
    n_splits = _splits(B, Hk * n_rb, longest, block_n, q.device)
    chunk = triton.cdiv(triton.cdiv(max(longest, 1), n_splits), block_n) * block_n
    pm = torch.empty(B * Hk * n_splits * R_pad, dtype=torch.float32, device=q.device)
    pl = torch.empty_like(pm)
    po = torch.empty(B * Hk * n_splits * R_pad * BLOCK_DV, dtype=torch.float32, device=q.device)
    paged = block_table is not None
    bt = block_table if paged else lens
    rows_per_block = k_cache.shape[2]
    max_blocks = block_table.shape[1] if paged else 0
    al = alibi_slopes.contiguous() if alibi_slopes is not None else pm
    sab = alibi_slopes.shape[1] if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0
    _decode_split[(n_splits, B * Hk, n_rb)](
        q, k_cache, v_cache, lens, bt, pm, pl, po, al, H, Hk, G, Lq, D, DV, rows_per_block, max_blocks, chunk,
        n_splits, scale * LOG2E, float(softcap) if softcap > 0 else 1.0, int(window_left), int(window_right), sab,
        CAUSAL=bool(causal), PAGED=paged, F32=q.dtype == torch.float32, BLOCK_R=BLOCK_R,
        BLOCK_N=block_n, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, num_warps=warps, num_stages=stages,
        SOFTCAP=softcap > 0, WINDOW=window_left >= 0 or window_right >= 0, ALIBI=alibi_slopes is not None)
    out = poisoned_empty(B, H, Lq, DV, dtype=q.dtype, device=q.device)
    lse = poisoned_empty(B, H, Lq, dtype=torch.float32, device=q.device)
    _decode_combine[(B * Hk, R)](pm, pl, po, out, lse, H, Hk, G, Lq, DV, n_splits, R_pad, BLOCK_DV=BLOCK_DV,
                                 BLOCK_S=_pow2(n_splits, 2))
    return out, lse


def append(k_cache, v_cache, k, v, seqlens, block_table) -> None:
    """Write k, v (B, Hk, Lnew, D) at positions seqlens[b] .. + Lnew - 1, in place."""
    B, Hk, Lnew, _ = k.shape
    if Lnew == 0:
        return
    dev = k_cache.device
    pos = seqlens.to(torch.int64)[:, None] + torch.arange(Lnew, device=dev)[None, :]  # (B, Lnew)
    rows = k_cache.shape[2]
    heads = torch.arange(Hk, device=dev)[None, :, None]
    if block_table is None:
        row = (torch.arange(B, device=dev)[:, None, None] * Hk + heads) * rows + pos[:, None, :]
    else:
        blk = torch.gather(block_table.to(torch.int64), 1, pos // rows)
        row = (blk[:, None, :] * Hk + heads) * rows + (pos % rows)[:, None, :]
    row = row.reshape(-1)
    k_cache.view(-1, k_cache.shape[-1]).index_copy_(0, row, k.reshape(-1, k.shape[-1]).to(k_cache.dtype))
    v_cache.view(-1, v_cache.shape[-1]).index_copy_(0, row, v.reshape(-1, v.shape[-1]).to(v_cache.dtype))


def kvcache_attention(q, k_cache, v_cache, k, v, cache_seqlens, block_table, causal, scale, softcap=0.0,
                      window_left=-1, window_right=-1, alibi_slopes=None):
    """The op's body on a GPU (or, for tests, on CPU tensors under the interpreter). The
    Python API has checked every argument and value."""
    seqlens = cache_seqlens.to(torch.int64)
    Lnew = 0 if k is None else k.shape[2]
    if k is not None:
        append(k_cache, v_cache, k, v, seqlens, block_table)
    lens = (seqlens + Lnew).contiguous()
    if q.dtype == torch.float64:  # for gradcheck-style tests, not speed: the materialized math
        from seqkernels.reference.attention import kvcache_attention as ref

        out, lse, _, _ = ref(q, k_cache, v_cache, None, None, lens.cpu(), block_table, causal, scale, softcap=softcap,
                             window=(window_left, window_right), alibi_slopes=alibi_slopes)
        return out.to(q.device), lse.to(q.device)
    longest = int(lens.max()) if lens.numel() else 0
    out, lse = attention(q, k_cache, v_cache, lens, block_table, causal, scale, longest, softcap, window_left,
                         window_right, alibi_slopes)
    return out, (lse.double() if q.dtype == torch.float64 else lse)


# --- ahead-of-time compile report ------------------------------------------------------------

def aot_cases() -> list[tuple]:
    """(kernel, arch, head dim, config, dtype, paged, causal) for every config."""
    out = []
    for arch in (80, 90):
        for kind, dtype in (("half", "fp16"), ("f32", "fp32")):
            for d, cfgs in CONFIGS[kind].items():
                out += [("split", arch, d, cfg, dtype, paged, True) for cfg in cfgs for paged in (False, True)]
        out += [("combine", arch, d, CONFIGS["half"][d][0], "fp16", False, True) for d in CONFIGS["half"]]
    return out


def aot_compile(kernel: str, arch: int, d: int, cfg: tuple, dtype: str, paged: bool, causal: bool) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .aot import SMEM_LIMIT, resources

    block_n, warps, stages = cfg
    if kernel == "split":
        fn = _decode_split
        sig = {"Q": "*" + dtype, "KC": "*" + dtype, "VC": "*" + dtype, "LENS": "*i64", "BT": "*i32",
               "PM": "*fp32", "PL": "*fp32", "PO": "*fp32", "AL": "*fp32"}
        # the paged variant with every option on (softcap, window, ALiBi): the heaviest
        consts = dict(CAUSAL=causal, PAGED=paged, F32=dtype == "fp32", BLOCK_R=BLOCK_R, BLOCK_N=block_n, BLOCK_D=d,
                      BLOCK_DV=d, SOFTCAP=paged, WINDOW=paged, ALIBI=paged)
    else:
        fn = _decode_combine
        sig = {"PM": "*fp32", "PL": "*fp32", "PO": "*fp32", "O": "*" + dtype, "LSE": "*fp32"}
        consts = dict(BLOCK_DV=d, BLOCK_S=MAX_SPLITS)
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name not in sig:
            sig[name] = "fp32" if name in ("qk_scale", "softcap") else "i32"
    c = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    res = resources(c.asm["cubin"])
    return dict(kernel="decode_" + kernel, arch=arch, head_dim=d, config=list(cfg), dtype=dtype, paged=paged,
                shared=c.metadata.shared, regs=res["REG"], stack=res["STACK"], local=res["LOCAL"],
                smem_limit=SMEM_LIMIT[arch])
