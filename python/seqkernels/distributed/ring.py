"""Context-parallel ring flash attention on torch.distributed (Ring Attention, Liu et al.
2023), forward and backward, on any backend with point-to-point ops: gloo for CPU
tensors, NCCL for CUDA tensors.

One sequence of length L is split over the P ranks of a process group. Each rank keeps
its query shard; the K/V shards travel around the ring (rank r sends to r + 1 and receives
from r - 1), and at step s rank r attends to the shard of rank r - s with the fused kernel,
which also returns each row's log-sum-exp. Partial outputs merge exactly by their LSE:

    lse = logaddexp(lse_a, lse_b),  out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

The next shard's transfer is posted (``batch_isend_irecv``) before the current one is
computed, so communication overlaps compute. The backward is a ring too: with the final
output and LSE saved, the gradient of one K/V block is exact on its own (P = exp(S - LSE));
each block's dK/dV accumulators travel with it and arrive back at its owner after P steps.

Layouts. ``"contiguous"``: rank r holds positions [r L/P, (r + 1) L/P). Under a causal mask
rank r then works on r + 1 of the P blocks it sees, so the last rank does P times the work
of the first. ``"zigzag"``: the sequence is cut into 2P chunks and rank r holds chunks r and
2P - 1 - r, so every rank does the same work (one causal diagonal step, then half a block
per step).

``method="allgather"`` (Llama 3's choice) gathers the whole K/V on every rank with one
all-gather instead of P - 1 ring steps: fewer, larger messages and no per-step latency, but
every rank holds the full sequence's K/V (2 L Hk D elements per batch row, against 2 (L / P)
Hk D for the ring, plus the same again for one block in flight), and in the backward every
rank forms the full dK/dV, summed across ranks with an all-reduce (gloo has no
reduce-scatter).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..errors import ArgumentError
from ..ops.attention import _bwd, check_attention_inputs, flash_attention

LAYOUTS = ("contiguous", "zigzag")
METHODS = ("ring", "allgather")
_FN = "ring_flash_attention"


# --- the process group ----------------------------------------------------------------------

def _dist():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ArgumentError("seqkernels.distributed needs an initialized process group: call "
                            "torch.distributed.init_process_group first")
    return dist


def _group_rank_size(group):
    dist = _dist()
    return dist.get_rank(group), dist.get_world_size(group)


def _global_rank(group, rank: int) -> int:
    dist = _dist()
    return rank if group is None else dist.get_global_rank(group, rank)


def _check_layout(layout: str, fn: str) -> None:
    if layout not in LAYOUTS:
        raise ArgumentError(f"{fn}: layout must be one of {LAYOUTS}, got {layout!r}")


# --- sharding ---------------------------------------------------------------------------------

def _chunk_ids(rank: int, P: int, layout: str) -> list[int]:
    """The chunks of the sequence rank holds, in order: one of P, or two of 2P (zigzag)."""
    return [rank] if layout == "contiguous" else [rank, 2 * P - 1 - rank]


def shard_sequence(x: Tensor, dim: int, layout: str = "contiguous", group=None) -> Tensor:
    """This rank's shard of the full tensor ``x`` along ``dim`` (a contiguous copy): chunk r of
    P (``"contiguous"``), or chunks r and 2P - 1 - r of 2P, concatenated (``"zigzag"``)."""
    _check_layout(layout, "shard_sequence")
    rank, P = _group_rank_size(group)
    ids = _chunk_ids(rank, P, layout)
    n = 2 * P if layout == "zigzag" else P
    if x.shape[dim] % n:
        raise ArgumentError(f"shard_sequence: the length {x.shape[dim]} along dim {dim} is not a multiple of "
                            f"{n}, the number of chunks of the {layout!r} layout over {P} ranks")
    c = x.shape[dim] // n
    return torch.cat([x.narrow(dim, i * c, c) for i in ids], dim=dim).contiguous()


def unshard_sequence(x: Tensor, dim: int, layout: str = "contiguous", group=None) -> Tensor:
    """The full tensor from every rank's shard (an all-gather, then the chunks in sequence
    order); the inverse of :func:`shard_sequence`. Not differentiable."""
    _check_layout(layout, "unshard_sequence")
    dist = _dist()
    rank, P = _group_rank_size(group)
    parts = [torch.empty_like(x) for _ in range(P)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return _in_sequence_order(parts, dim, P, layout)


def _in_sequence_order(parts: list[Tensor], dim: int, P: int, layout: str) -> Tensor:
    if layout == "contiguous":
        return torch.cat(parts, dim=dim)
    chunks = [None] * (2 * P)
    for r, part in enumerate(parts):
        a, b = part.chunk(2, dim=dim)
        chunks[r], chunks[2 * P - 1 - r] = a, b
    return torch.cat(chunks, dim=dim)


# --- which blocks a ring step computes ----------------------------------------------------------

def _ring_blocks(rank: int, src: int, causal: bool, layout: str, L: int):
    """(query rows, key rows, causal flag) of this rank's work on the K/V shard of rank src
    (slices of the local shards), under a causal mask over global positions."""
    every = slice(None)
    if not causal:
        return [(every, every, False)]
    if src == rank:  # the shard against itself: positions rise with the local index on both sides
        return [(every, every, True)]
    if layout == "contiguous":
        return [(every, every, False)] if src < rank else []
    c = L // 2  # zigzag: chunks (rank, 2P-1-rank) against (src, 2P-1-src)
    if src < rank:  # both query chunks see all of chunk src, none of chunk 2P-1-src
        return [(every, slice(0, c), False)]
    return [(slice(c, None), every, False)]  # only chunk 2P-1-rank sees src's shard, all of it


def _merge(acc_out: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor, rows: slice) -> None:
    """acc[rows] <- the exact combination of two partial softmaxes, by their LSEs. Rows that
    no key has reached yet (-inf) take the other side as it is; NaN propagates."""
    a_out, a_lse = acc_out[:, :, rows], acc_lse[:, :, rows]
    new = torch.logaddexp(a_lse, lse)
    none = new == float("-inf")
    wa = torch.where(none, 0.0, torch.exp(a_lse - new))
    wb = torch.where(none, 0.0, torch.exp(lse - new))
    a_out.copy_(a_out * wa.unsqueeze(-1) + out.to(a_out.dtype) * wb.unsqueeze(-1))
    a_lse.copy_(new)


# --- point-to-point -----------------------------------------------------------------------------

def _post_ring(tensors: list[Tensor], group, send_to: int, recv_from: int):
    """Post the sends of ``tensors`` to the next rank and receives of as many from the
    previous one (one batch); returns (receive buffers, requests). No packed copy: a rank
    holds its block, the block in flight and nothing else."""
    dist = _dist()
    recv = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), send_to, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, recv_from, group) for r in recv]
    return recv, dist.batch_isend_irecv(ops)


def _wait(reqs) -> None:
    for r in reqs:
        r.wait()


# --- the ring -------------------------------------------------------------------------------------

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_grads(grad_out, q, k, v, out, lse, causal, scale):
    """The exact gradients of one (query rows, K/V block) pair given the final out and LSE.
    The CPU kernel takes float32 / float64: half inputs are widened, as flash_attention does."""
    if q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16):
        grad_out, q, k, v, out = (t.float() for t in (grad_out, q, k, v, out))
    return _bwd(grad_out, None, q, k, v, out, lse, causal, True, scale, None, None, 0.0, None)


def _ring_forward(q, k, v, group, causal, scale, layout):
    rank, P = _group_rank_size(group)
    nxt, prv = _global_rank(group, (rank + 1) % P), _global_rank(group, (rank - 1) % P)
    B, H, L, _ = q.shape
    out = torch.zeros(B, H, L, v.shape[-1], dtype=_acc_dtype(q.dtype), device=q.device)
    lse = torch.full((B, H, L), float("-inf"), dtype=out.dtype, device=q.device)
    kv = [k.contiguous(), v.contiguous()]  # sent as they are: no temporary copy to keep alive
    for step in range(P):
        reqs = None
        if step < P - 1:  # the next shard travels while this one is computed
            buf, reqs = _post_ring(kv, group, nxt, prv)
        for rows, keys, c in _ring_blocks(rank, (rank - step) % P, causal, layout, L):
            o, l = flash_attention(q[:, :, rows], kv[0][:, :, keys], kv[1][:, :, keys], causal=c, scale=scale,
                                   return_lse=True)
            _merge(out, lse, o, l.to(lse.dtype), rows)
        if reqs is not None:
            _wait(reqs)
            kv = buf
    return out.to(q.dtype), lse


def _ring_backward(grad_out, q, k, v, out, lse, group, causal, scale, layout):
    rank, P = _group_rank_size(group)
    nxt, prv = _global_rank(group, (rank + 1) % P), _global_rank(group, (rank - 1) % P)
    L = q.shape[2]
    acc = _acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = [k.contiguous(), v.contiguous()]  # sent as they are: no temporary copy to keep alive
    dkv = [torch.zeros(k.shape, dtype=acc, device=k.device), torch.zeros(v.shape, dtype=acc, device=v.device)]
    lse_in = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    for step in range(P):
        reqs = None
        if step < P - 1:
            buf, reqs = _post_ring(kv, group, nxt, prv)
        for rows, keys, c in _ring_blocks(rank, (rank - step) % P, causal, layout, L):
            g_q, g_k, g_v = _block_grads(grad_out[:, :, rows], q[:, :, rows], kv[0][:, :, keys],
                                         kv[1][:, :, keys], out[:, :, rows], lse_in[:, :, rows], c, scale)
            dq[:, :, rows] += g_q
            dkv[0][:, :, keys] += g_k
            dkv[1][:, :, keys] += g_v
        if P == 1:
            break
        # the block's gradient accumulators follow the block; after P steps they are home
        dbuf, dreqs = _post_ring(dkv, group, nxt, prv)
        if reqs is not None:
            _wait(reqs)
            kv = buf
        _wait(dreqs)
        dkv = dbuf
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


# --- the all-gather variant -------------------------------------------------------------------------

def _gather_blocks(rank: int, P: int, causal: bool, layout: str, L: int):
    """(query rows, number of leading global keys, causal flag) for the all-gather variant:
    a query chunk that ends at global position e sees keys [0, e) (bottom-right causal)."""
    if not causal:
        return [(slice(None), P * L, False)]
    if layout == "contiguous":
        return [(slice(None), (rank + 1) * L, True)]
    c = L // 2
    return [(slice(0, c), (rank + 1) * c, True), (slice(c, None), (2 * P - rank) * c, True)]


def _gather_forward(q, k, v, group, causal, scale, layout):
    rank, P = _group_rank_size(group)
    K, V = unshard_sequence(k, 2, layout, group), unshard_sequence(v, 2, layout, group)
    outs, lses = [], []
    for rows, n, c in _gather_blocks(rank, P, causal, layout, q.shape[2]):
        o, l = flash_attention(q[:, :, rows], K[:, :, :n], V[:, :, :n], causal=c, scale=scale, return_lse=True)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2), K, V


def _gather_backward(grad_out, q, K, V, out, lse, group, causal, scale, layout):
    dist = _dist()
    rank, P = _group_rank_size(group)
    acc = _acc_dtype(q.dtype)
    dq = torch.empty_like(q)
    dK, dV = torch.zeros(K.shape, dtype=acc, device=K.device), torch.zeros(V.shape, dtype=acc, device=V.device)
    for rows, n, c in _gather_blocks(rank, P, causal, layout, q.shape[2]):
        g_q, g_k, g_v = _block_grads(grad_out[:, :, rows], q[:, :, rows], K[:, :, :n], V[:, :, :n], out[:, :, rows],
                                     lse[:, :, rows], c, scale)
        dq[:, :, rows] = g_q
        dK[:, :, :n] += g_k
        dV[:, :, :n] += g_v
    dist.all_reduce(dK, group=group)
    dist.all_reduce(dV, group=group)
    return dq, _own_shard(dK, rank, P, layout).to(K.dtype), _own_shard(dV, rank, P, layout).to(V.dtype)


def _own_shard(x: Tensor, rank: int, P: int, layout: str) -> Tensor:
    n = 2 * P if layout == "zigzag" else P
    c = x.shape[2] // n
    return torch.cat([x[:, :, i * c:(i + 1) * c] for i in _chunk_ids(rank, P, layout)], dim=2)


# --- autograd and the public function --------------------------------------------------------------

class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, layout, method):
        if method == "ring":
            out, lse = _ring_forward(q, k, v, group, causal, scale, layout)
            ctx.save_for_backward(q, k, v, out, lse)
        else:
            out, lse, K, V = _gather_forward(q, k, v, group, causal, scale, layout)
            ctx.save_for_backward(q, K, V, out, lse)
        ctx.group, ctx.causal, ctx.scale, ctx.layout, ctx.method = group, causal, scale, layout, method
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        step = _ring_backward if ctx.method == "ring" else _gather_backward
        dq, dk, dv = step(grad_out, q, k, v, out, lse, ctx.group, ctx.causal, ctx.scale, ctx.layout)
        return dq, dk, dv, None, None, None, None, None


def ring_flash_attention(q: Tensor, k: Tensor, v: Tensor, group=None, causal: bool = False,
                         scale: Optional[float] = None, layout: str = "contiguous", method: str = "ring") -> Tensor:
    """Exact attention over a sequence sharded across the ranks of ``group`` (default: the world).

    Args:
        q: this rank's query shard (B, H, L/P, D).
        k, v: this rank's key/value shards (B, Hk, L/P, D) and (B, Hk, L/P, Dv); Hk divides H.
            Every rank's shards have the same length (the sequence is cut evenly).
        group: a torch.distributed process group; gloo with CPU tensors, NCCL with CUDA ones.
        causal: a causal mask over global positions (query at position i sees keys <= i;
            bottom-right and top-left agree, since q and k cover the same sequence).
        scale: softmax scale, default 1/sqrt(D).
        layout: how the sequence was cut (see :func:`shard_sequence`): ``"contiguous"`` or
            ``"zigzag"`` (causal load balance; the shard length must be even).
        method: ``"ring"`` (K/V shards pass around the ring; no rank holds more than two) or
            ``"allgather"`` (one all-gather of the whole K/V; more memory, fewer messages).

    Returns this rank's output shard (B, H, L/P, Dv), differentiable in q, k and v (the
    backward is collective too: every rank must run it). float32, float64, bfloat16 and
    float16; partial results merge in float32 (float64 for float64 inputs).
    """
    check_attention_inputs(q, k, v, fn=_FN)
    _check_layout(layout, _FN)
    if method not in METHODS:
        raise ArgumentError(f"{_FN}: method must be one of {METHODS}, got {method!r}")
    dist = _dist()
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and q.device.type != "cuda":
        raise ArgumentError(f"{_FN}: the NCCL backend needs CUDA tensors, got {q.device}")
    if q.shape[2] != k.shape[2]:
        raise ArgumentError(f"{_FN}: q and k shards must have the same length (one sequence, self-attention), "
                            f"got {q.shape[2]} and {k.shape[2]}")
    _check_shards_equal(q, group, layout)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _RingAttention.apply(q, k, v, group, bool(causal), scale, layout, method)


def _check_shards_equal(q: Tensor, group, layout: str) -> None:
    """Every rank raises the same error (they all see the same gathered lengths), so no rank
    is left waiting in a collective."""
    dist = _dist()
    rank, P = _group_rank_size(group)
    mine = torch.tensor([q.shape[0], q.shape[1], q.shape[2]], dtype=torch.int64, device=q.device)
    every = [torch.empty_like(mine) for _ in range(P)]
    dist.all_gather(every, mine, group=group)
    shapes = [tuple(int(x) for x in t.tolist()) for t in every]
    if len(set(shapes)) != 1:
        raise ArgumentError(f"{_FN}: every rank's shard must have the same (batch, heads, length); got "
                            + ", ".join(f"rank {r}: {s}" for r, s in enumerate(shapes)))
    if layout == "zigzag" and shapes[0][2] % 2:
        raise ArgumentError(f"{_FN}: the zigzag layout holds two equal chunks per rank, so the shard length must "
                            f"be even, got {shapes[0][2]}")
