"""The decode regime of flash_attention and flash_attention_with_kvcache against the
float64 reference: per-batch cache lengths (0 and full included), appended rows bit for
bit, untouched (NaN-poisoned) rows never read, paged caches with shuffled block tables,
split-K, bad input leaving the caches unchanged, opcheck and torch.compile."""

from __future__ import annotations

import pytest
import torch

import seqkernels
from seqkernels import reference as ref
from seqkernels import testing

OP = torch.ops.seqkernels.flash_attention_kvcache
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def _caches(B, Hk, D, Dv, dtype, seqlens, Lnew, paged=None, g=None, Lmax=None):
    """Caches whose live rows are random and whose other rows are NaN (never to be read)."""
    if paged is None:
        Lmax = Lmax or max(max(seqlens) + Lnew, 1)
        kc = torch.full((B, Hk, Lmax, D), float("nan"), dtype=dtype)
        vc = torch.full((B, Hk, Lmax, Dv), float("nan"), dtype=dtype)
        for b, n in enumerate(seqlens):
            kc[b, :, :n] = torch.randn(Hk, n, D, generator=g).to(dtype)
            vc[b, :, :n] = torch.randn(Hk, n, Dv, generator=g).to(dtype)
        return kc, vc, None
    bs = paged
    per_seq = max((max(seqlens) + Lnew + bs - 1) // bs, 1)
    nb = B * per_seq + 3
    kc = torch.full((nb, Hk, bs, D), float("nan"), dtype=dtype)
    vc = torch.full((nb, Hk, bs, Dv), float("nan"), dtype=dtype)
    table = torch.randperm(nb, generator=g)[:B * per_seq].reshape(B, per_seq).to(torch.int32)
    for b, n in enumerate(seqlens):
        for p in range(n):
            blk, r = int(table[b, p // bs]), p % bs
            kc[blk, :, r] = torch.randn(Hk, D, generator=g).to(dtype)
            vc[blk, :, r] = torch.randn(Hk, Dv, generator=g).to(dtype)
    return kc, vc, table


def _check(B=3, H=8, Hk=2, Lq=1, D=64, Dv=None, seqlens=(0, 17, 40), Lnew=1, paged=None, dtype=torch.float32,
           causal=True, Lmax=None, **options):
    """One step against the float64 reference; options: softcap, window, alibi_slopes."""
    Dv = Dv or D
    g = torch.Generator().manual_seed(B * 1000 + Lq * 10 + Lnew)
    kc, vc, table = _caches(B, Hk, D, Dv, dtype, seqlens, Lnew, paged, g, Lmax)
    q = torch.randn(B, H, Lq, D, generator=g).to(dtype)
    k = torch.randn(B, Hk, Lnew, D, generator=g).to(dtype) if Lnew else None
    v = torch.randn(B, Hk, Lnew, Dv, generator=g).to(dtype) if Lnew else None
    sl = torch.tensor(seqlens, dtype=torch.int32)
    e, el, ek, ev = ref.kvcache_attention(q.double(), kc.double(), vc.double(),
                                          None if k is None else k.double(), None if v is None else v.double(),
                                          sl, table, causal, **options)
    with torch.no_grad():
        out, lse = seqkernels.flash_attention_with_kvcache(q, kc, vc, k, v, sl, table, causal=causal,
                                                           return_lse=True, **options)
    # appended rows bit for bit, every other row as it was (NaN stays NaN)
    assert torch.equal(kc.double().nan_to_num(7.0), ek.nan_to_num(7.0))
    assert torch.equal(vc.double().nan_to_num(7.0), ev.nan_to_num(7.0))
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), e, rtol=tol, atol=tol)
    fin = torch.isfinite(el)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse.double()[fin], el[fin], rtol=tol, atol=tol)
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("G", [1, 4, 8])
def test_dtypes_and_groups(dtype, G):
    _check(H=2 * G, Hk=2, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D,Dv", [(64, 64), (80, 80), (128, 128), (256, 256), (37, 19), (48, 80)])
def test_head_dims(D, Dv, dtype):
    """Head dims that fill whole vector chunks and ones that end inside one (80 = 64 + 16 in
    32-lane bf16 chunks): a tile that loaded a whole chunk at a row's end would read the next
    row, here a NaN one past the sequence's end."""
    _check(D=D, Dv=Dv, seqlens=(5, 0, 23), dtype=dtype)


@pytest.mark.parametrize("Lq,Lnew", [(1, 0), (1, 1), (2, 5), (5, 2), (17, 17), (3, 0), (16, 9)])
@pytest.mark.parametrize("causal", [True, False])
def test_query_rows_and_new_keys(Lq, Lnew, causal):
    _check(Lq=Lq, Lnew=Lnew, causal=causal, seqlens=(0, 11, 30))


def test_full_cache_and_empty_cache():
    _check(seqlens=(39, 0, 12), Lnew=1, Lmax=40)  # the first sequence fills its cache
    _check(seqlens=(0, 0, 0), Lnew=0)  # no key at all: zeros and LSE -inf


@pytest.mark.parametrize("block", [1, 16, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged(block, dtype):
    _check(paged=block, seqlens=(0, 45, 300), Lnew=3, Lq=2, dtype=dtype)


@pytest.mark.parametrize("dtype,D", [(torch.float32, 64), (torch.float32, 80), (torch.bfloat16, 80)])
def test_split_k_matches_one_chunk(dtype, D):
    """B x Hk = 1: one thread takes the 3001 keys (not a multiple of a block or a tile) in one
    chunk, two threads split them; both match the float64 reference and each other."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 4, n, D, generator=g).to(dtype) for n in (1, 3001, 3001))
    k, v = k[:, :1], v[:, :1]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = seqkernels.flash_attention(q, k, v, return_lse=True)
        torch.set_num_threads(2)
        split = seqkernels.flash_attention(q, k, v, return_lse=True)
    finally:
        torch.set_num_threads(threads)
    e = ref.flash_attention(q.double(), k.double(), v.double())
    tol = 2e-5 if dtype == torch.float32 else TOL[dtype]
    for a, b, x in zip(one, split, e):
        torch.testing.assert_close(a.double(), x, rtol=tol, atol=tol)
        torch.testing.assert_close(b.double(), x, rtol=tol, atol=tol)
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask", ["none", "bool", "float", "lengths"])
@pytest.mark.parametrize("G,Lq", [(1, 1), (4, 1), (4, 4), (1, 16)])
def test_decode_path_equals_general_path(mask, G, Lq):
    """The same rows through the decode kernel (G * Lq <= 16) and, padded with more query
    rows, through the general kernel."""
    g = torch.Generator().manual_seed(G * 10 + Lq)
    B, Hk, Lk, D = 2, 2, 700, 32
    q = torch.randn(B, Hk * G, Lq, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, Hk, Lk, D, generator=g, dtype=torch.float64) for _ in range(2))
    kw = {}
    if mask == "bool":
        kw["attn_mask"] = torch.rand(B, 1, 1, Lk, generator=g) > 0.3
    elif mask == "float":
        kw["attn_mask"] = torch.randn(B, 1, 1, Lk, generator=g, dtype=torch.float64)
    elif mask == "lengths":
        kw["key_lengths"] = torch.tensor([Lk, 301])
    pad = torch.randn(B, Hk * G, 17, D, generator=g, dtype=torch.float64)
    decode = seqkernels.flash_attention(q, k, v, return_lse=True, **kw)
    general = seqkernels.flash_attention(torch.cat([q, pad], 2), k, v, return_lse=True, **kw)
    torch.testing.assert_close(decode[0], general[0][:, :, :Lq], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(decode[1], general[1][:, :, :Lq], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal,bottom_right", [(True, True), (True, False)])
def test_decode_path_causal_alignments(causal, bottom_right):
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 8, 3, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 40, 16, generator=g, dtype=torch.float64) for _ in range(2))
    out, lse = torch.ops.seqkernels.flash_attention_forward(q, k, v, causal, bottom_right, 0.25)
    e, el = ref.flash_attention(q, k, v, causal=causal, scale=0.25, bottom_right=bottom_right)
    testing.assert_close(out, e)
    testing.assert_close(lse, el)


def test_decode_gradients_through_the_general_backward():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 1, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 9, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda q, k, v: seqkernels.flash_attention(q, k, v, causal=True), (q, k, v))


def _bad_setup():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 1, 8, generator=g)
    kc, vc = torch.randn(2, 2, 10, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g)
    k, v = torch.randn(2, 2, 3, 8, generator=g), torch.randn(2, 2, 3, 8, generator=g)
    return q, kc, vc, k, v


BAD = {
    "write past the end": (lambda q, kc, vc, k, v: dict(k=k, v=v, cache_seqlens=torch.tensor([2, 8]))),
    "negative length": (lambda q, kc, vc, k, v: dict(k=k, v=v, cache_seqlens=torch.tensor([-1, 0]))),
    "block id out of range": (lambda q, kc, vc, k, v: dict(
        k=k, v=v, cache_seqlens=torch.tensor([2, 2]), block_table=torch.tensor([[0, 1], [2, 7]], dtype=torch.int32))),
    "block table dtype": (lambda q, kc, vc, k, v: dict(
        k=k, v=v, cache_seqlens=torch.tensor([2, 2]), block_table=torch.tensor([[0, 1], [1, 0]]))),
    "dtype": (lambda q, kc, vc, k, v: dict(k=k.double(), v=v.double(), cache_seqlens=torch.tensor([0, 0]))),
    "heads": (lambda q, kc, vc, k, v: dict(k=k[:, :1], v=v[:, :1], cache_seqlens=torch.tensor([0, 0]))),
    "k without v": (lambda q, kc, vc, k, v: dict(k=k, cache_seqlens=torch.tensor([0, 0]))),
    "seqlens shape": (lambda q, kc, vc, k, v: dict(k=k, v=v, cache_seqlens=torch.tensor([0]))),
}


@pytest.mark.parametrize("name", list(BAD))
@pytest.mark.parametrize("direct", [False, True])
def test_bad_input_leaves_the_caches_unchanged(name, direct):
    q, kc, vc, k, v = _bad_setup()
    kw = BAD[name](q, kc, vc, k, v)
    if name.startswith("block"):
        kc, vc = torch.randn(5, 2, 4, 8), torch.randn(5, 2, 4, 8)
    before = kc.clone(), vc.clone()
    with torch.no_grad(), pytest.raises((ValueError, TypeError, RuntimeError)):
        if direct:  # the op itself checks in C++ too
            OP(q, kc, vc, kw.get("k"), kw.get("v"), kw["cache_seqlens"], kw.get("block_table"), True, 0.3)
        else:
            seqkernels.flash_attention_with_kvcache(q, kc, vc, **kw)
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])


def test_requires_grad_raises():
    q, kc, vc, k, v = _bad_setup()
    with pytest.raises(RuntimeError, match="inference only"):
        seqkernels.flash_attention_with_kvcache(q.requires_grad_(), kc, vc, k, v, 0)


def test_int_cache_seqlens_and_whole_cache():
    q, kc, vc, k, v = _bad_setup()
    with torch.no_grad():
        a = seqkernels.flash_attention_with_kvcache(q, kc.clone(), vc.clone(), k, v, 4)
        b = seqkernels.flash_attention_with_kvcache(q, kc.clone(), vc.clone(), k, v, torch.tensor([4, 4]))
        whole = seqkernels.flash_attention_with_kvcache(q, kc, vc)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(whole, seqkernels.flash_attention(q, kc, vc))


def test_opcheck():
    q, kc, vc, k, v = _bad_setup()
    torch.library.opcheck(OP, (q, kc, vc, k, v, torch.tensor([1, 4], dtype=torch.int32), None, True, 0.3))
    kp, vp = torch.randn(6, 2, 4, 8), torch.randn(6, 2, 4, 8)
    table = torch.tensor([[5, 0, 3], [1, 2, 4]], dtype=torch.int32)
    torch.library.opcheck(OP, (q, kp, vp, k, v, torch.tensor([1, 9], dtype=torch.int32), table, True, 0.3))


def test_compiled_decode_steps_do_not_recompile():
    torch._dynamo.reset()
    B, H, Hk, D, Lmax = 2, 4, 2, 8, 12
    kc, vc = torch.zeros(B, Hk, Lmax, D), torch.zeros(B, Hk, Lmax, D)
    kc_e, vc_e = kc.clone(), vc.clone()
    counts = {"n": 0}

    def backend(gm, example_inputs):
        counts["n"] += 1
        return gm

    def step(q, k, v, kc, vc, sl):
        return seqkernels.flash_attention_with_kvcache(q, kc, vc, k, v, sl)

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    sl = torch.tensor([0, 3], dtype=torch.int32)
    with torch.no_grad():
        for _ in range(5):
            q, k, v = torch.randn(B, H, 1, D), torch.randn(B, Hk, 1, D), torch.randn(B, Hk, 1, D)
            a = compiled(q, k, v, kc, vc, sl)
            e = step(q, k, v, kc_e, vc_e, sl)
            torch.testing.assert_close(a, e)
            sl += 1
    assert torch.equal(kc, kc_e) and torch.equal(vc, vc_e)
    assert counts["n"] == 1


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("G,Lq,Lk", [(1, 1, 1), (4, 1, 513), (8, 2, 97), (1, 16, 300), (4, 3, 2)])
def test_decode_kernel_equals_general_kernel_switch(causal, G, Lq, Lk):
    """The same call with the decode kernel and with it switched off (the general kernel)."""
    g = torch.Generator().manual_seed(G + Lq + Lk)
    q = torch.randn(2, 2 * G, Lq, 24, generator=g)
    k, v = (torch.randn(2, 2, Lk, 24, generator=g) for _ in range(2))
    a = seqkernels.flash_attention(q, k, v, causal=causal, return_lse=True)
    with testing.decode_regime(False):
        e = seqkernels.flash_attention(q, k, v, causal=causal, return_lse=True)
    torch.testing.assert_close(a[0], e[0], rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(a[1], e[1], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("D, Dv", [(576, 512), (192, 128), (300, 300), (1024, 1000)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_large_and_unequal_head_dims_in_a_step(D, Dv, dtype):
    # MLA's shapes (576 / 512, 192 / 128) and a head dim past 256
    _check(H=4, Hk=1, D=D, Dv=Dv, Lq=2, Lnew=2, seqlens=(3, 300, 41), dtype=dtype)


def test_head_dim_limit_in_a_step():
    q, kc = torch.randn(1, 2, 1, 1025), torch.zeros(1, 2, 4, 1025)
    with pytest.raises(seqkernels.errors.ArgumentError, match="head dims up to 1024"):
        seqkernels.flash_attention_with_kvcache(q, kc, kc.clone(), cache_seqlens=2)


@pytest.mark.parametrize("window", [(0, 0), (5, -1), (16, 0), (300, 0), (7, 3)])
@pytest.mark.parametrize("paged", [None, 16])
@pytest.mark.parametrize("Lq, Lnew", [(1, 1), (3, 3), (2, 0)])
def test_window_on_each_sequences_length(window, paged, Lq, Lnew):
    """The window sits on each sequence's own length (seqlens differ by sequence), as causal
    does (NaN rows past each sequence's length are never read)."""
    _check(Lq=Lq, Lnew=Lnew, seqlens=(0, 17, 400), paged=paged, dtype=torch.float64, window=window)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_softcap_and_window_in_a_step(dtype, causal):
    _check(Lq=2, Lnew=2, seqlens=(5, 90, 33), dtype=dtype, causal=causal, softcap=1.5, window=(20, 0))


@pytest.mark.parametrize("kwargs, match", [(dict(softcap=-1.0), "softcap"), (dict(window=(0, -2)), "window")])
def test_kvcache_option_errors(kwargs, match):
    q, kc, vc = torch.randn(1, 2, 1, 8), torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8)
    with pytest.raises(seqkernels.errors.ArgumentError, match=match):
        seqkernels.flash_attention_with_kvcache(q, kc, vc, cache_seqlens=2, **kwargs)
    with pytest.raises(ValueError, match=match):  # the op checks in C++ too
        torch.ops.seqkernels.flash_attention_kvcache(q, kc, vc, None, None, torch.tensor([2]), None, True, 0.3,
                                                     kwargs.get("softcap", 0.0), *kwargs.get("window", (-1, -1)))


def _tile_case(R_heads, Lq, D, Dv, Lk, dtype, causal, seed):
    g = torch.Generator().manual_seed(seed)
    Hk = 2
    q = torch.randn(1, Hk * R_heads, Lq, D, generator=g).to(dtype)
    k = torch.randn(1, Hk, Lk, D, generator=g).to(dtype)
    v = torch.randn(1, Hk, Lk, Dv, generator=g).to(dtype)
    return q, k, v


# Every row count the decode kernel tiles (R = G * Lq from 1 to 16: tiles of 8, 4, 2 and 1 rows
# and their sums), head dims that fill 16- and 32-lane chunks and ones that end inside one,
# key counts that end a block, a key group of the tile and a bf16 key pair anywhere.
ROWS = [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1), (7, 1), (8, 1), (9, 1), (11, 1), (12, 1), (13, 1),
        (15, 1), (16, 1), (3, 5), (2, 7), (1, 16)]


@pytest.mark.parametrize("G,Lq", ROWS)
@pytest.mark.parametrize("D,Dv,Lk", [(64, 64, 517), (80, 48, 263), (37, 19, 7), (128, 160, 256), (16, 40, 1)])
def test_every_row_tile_float32(G, Lq, D, Dv, Lk):
    q, k, v = _tile_case(G, Lq, D, Dv, Lk, torch.float32, Lq > 1, G * 100 + Lq + D + Lk)
    out, lse = seqkernels.flash_attention(q, k, v, causal=Lq > 1, return_lse=True)
    e, el = ref.flash_attention(q.double(), k.double(), v.double(), causal=Lq > 1)
    torch.testing.assert_close(out.double(), e, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(lse.double(), el, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("G,Lq", ROWS)
@pytest.mark.parametrize("D,Dv,Lk", [(64, 64, 517), (80, 48, 263), (37, 19, 7), (128, 160, 256), (16, 40, 1)])
def test_every_row_tile_bfloat16_within_twice_torchs_error(G, Lq, D, Dv, Lk):
    """bf16 K/V (bf16 dot products where the CPU has AVX512-BF16, P rounded to bf16 for the
    PV product): the error against float64 at most twice that of torch's own bf16 SDPA."""
    q, k, v = _tile_case(G, Lq, D, Dv, Lk, torch.bfloat16, Lq > 1, G * 100 + Lq + D + Lk)
    causal = Lq > 1
    out, lse = seqkernels.flash_attention(q, k, v, causal=causal, return_lse=True)
    e, el = ref.flash_attention(q.double(), k.double(), v.double(), causal=causal)
    mask = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq) if causal else None
    with torch.no_grad():
        t = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    err, terr = (out.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
    assert err <= 2 * terr + 1e-5, (err, terr)
    torch.testing.assert_close(lse.double(), el, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_rows_see_only_their_own_heads_and_keys(dtype):
    """One query head (and one key) made huge: only that head's outputs move, so no tile mixes
    rows or keys of another head or group (each head's rows are checked against the reference)."""
    g = torch.Generator().manual_seed(11)
    B, Hk, G, Lk, D = 2, 2, 6, 300, 64
    q = torch.randn(B, Hk * G, 1, D, generator=g)
    k, v = (torch.randn(B, Hk, Lk, D, generator=g) for _ in range(2))
    q[1, 7] *= 30.0
    v[0, 1, 299] = 50.0
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = seqkernels.flash_attention(q, k, v)
    e, _ = ref.flash_attention(q.double(), k.double(), v.double())
    tol = 2e-5 if dtype == torch.float32 else 6e-2
    torch.testing.assert_close(out.double(), e, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [None, 1, 7])
def test_key_counts_around_a_block_and_its_prefetch(dtype, block):
    """Cache lengths around the kernel's 256-key block and the 16 rows it looks ahead (the
    row pointers past a block are the next block's, or padding), contiguous and paged; split-K
    is in test_split_k_matches_one_chunk."""
    _check(B=4, paged=block, seqlens=(254, 255, 271, 272), Lnew=1, H=8, Hk=2, dtype=dtype)
    _check(B=4, paged=block, seqlens=(256, 239, 0, 511), Lnew=2, Lq=2, H=8, Hk=2, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G", [1, 4, 16])
@pytest.mark.parametrize("where,value", [("k", float("nan")), ("v", float("nan")), ("q", float("nan")),
                                         ("k", float("inf")), ("k", float("-inf")), ("v", float("inf"))])
def test_nan_and_inf_as_torch_places_them(dtype, G, where, value):
    """A NaN or infinity in one element of q, K or V: the decode kernel's output has NaN exactly
    where torch's own SDPA has it, and its other elements match torch's. bf16 inputs are
    compared with torch's SDPA on their float32 values: torch's own bf16 CPU path returns
    finite rows where a score is +inf (softmax's inf - inf), its float32 path and ours NaN."""
    g = torch.Generator().manual_seed(G)
    q = torch.randn(2, 2 * G, 1, 64, generator=g).to(dtype)
    k, v = (torch.randn(2, 2, 300, 64, generator=g).to(dtype) for _ in range(2))
    {"q": q, "k": k, "v": v}[where][1, 1, 0 if where == "q" else 123, 5] = value
    out = seqkernels.flash_attention(q, k, v)
    with torch.no_grad():
        t = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
    assert torch.equal(out.isnan(), t.isnan())
    fin = ~t.isnan()
    assert torch.equal(out.isinf(), t.isinf())
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out[fin].double(), t[fin].double(), rtol=tol, atol=tol)
