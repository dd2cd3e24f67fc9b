"""Masks, key padding and dropout in the attention kernels, and the SDPA drop-in.

The CPU kernel (csrc/attention/flash_attention_cpu.cpp, masking.h) against the float64
reference (seqkernels.reference.flash_attention with the same mask, key lengths and
dropout mask), and seqkernels.scaled_dot_product_attention against torch's own
torch.nn.functional.scaled_dot_product_attention. Shapes cross the kernel's tiles
(forward 256 x 384, backward 128 x 64) at odd lengths.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import seqkernels
from seqkernels import reference as ref
from seqkernels import testing
from seqkernels.ops import attention as attn_ops

from .test_attention import make

OPS = torch.ops.seqkernels


def grads(outs, ins, seed=7):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    return torch.autograd.grad(outs, ins, ws)


def kernel_keep_mask(rng_state_before, shape, p):
    """The dropout mask a call drew when torch's CPU generator was at ``rng_state_before``:
    the kernels take their seed from it (ops.attention._new_rng_state)."""
    torch.random.set_rng_state(rng_state_before)
    seed, offset = attn_ops._new_rng_state().tolist()
    return ref.dropout_keep_mask(shape, p, seed, offset)


def check_flash(q, k, v, *, causal=False, bottom_right=True, tol_scale=1.0, dropout_p=0.0, softcap=0.0, **masks):
    """flash_attention with masks against the float64 reference: out, lse, dq, dk, dv."""
    state = torch.random.get_rng_state()
    out, lse = seqkernels.flash_attention(q, k, v, causal=causal, return_lse=True, dropout_p=dropout_p,
                                          softcap=softcap, **masks)
    keep = None
    if dropout_p > 0:  # the same Philox stream the kernel drew its seed for
        keep = kernel_keep_mask(state, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), dropout_p)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    m64 = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in masks.items()}
    out_e, lse_e = ref.flash_attention(q64, k64, v64, causal=causal, bottom_right=bottom_right,
                                       dropout_p=dropout_p, dropout_mask=keep, softcap=softcap, **m64)
    dt = q.dtype
    testing.assert_close(out, out_e, dt, tol_scale, "out")
    fin = torch.isfinite(lse_e)
    assert torch.equal(torch.isfinite(lse), fin), "lse: -inf rows differ"
    testing.assert_close(lse[fin], lse_e[fin], torch.float32 if dt != torch.float64 else dt, tol_scale, "lse")
    for name, a, e in zip(("dq", "dk", "dv"), grads([out], (q, k, v)), grads([out_e], (q64, k64, v64))):
        testing.assert_close(a, e, dt, 4 * tol_scale, name)


# Every broadcast of a (B, H, Lq, Lk) mask: 4-D with each dim 1 or full, and lower ranks.
B, H, HK, LQ, LK = 2, 4, 2, 131, 389
MASK_SHAPES = [(B, H, LQ, LK), (B, 1, LQ, LK), (1, H, LQ, LK), (B, 1, 1, LK), (1, 1, LQ, 1), (LQ, LK), (LK,),
               (1, H, 1, 1), (B, H, 1, LK)]


@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_attn_mask_every_broadcast(shape, kind):
    torch.manual_seed(0)
    q, k, v = make(B, H, HK, LQ, LK, 16)
    if kind == "bool":
        mask = torch.rand(shape) > 0.3
    else:
        mask = torch.randn(shape, dtype=torch.float64) * 2
    check_flash(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("causal,bottom_right", [(True, True), (True, False)])
@pytest.mark.parametrize("Lq,Lk", [(1, 1), (131, 389), (389, 131), (257, 257)])
def test_mask_and_key_lengths_with_causal_and_gqa(causal, bottom_right, Lq, Lk):
    torch.manual_seed(1)
    q, k, v = make(3, 6, 2, Lq, Lk, 24)
    mask = torch.rand(3, 1, Lq, Lk) > 0.2
    lengths = torch.tensor([Lk, max(Lk // 2, 1), 1])
    if bottom_right:
        check_flash(q, k, v, causal=causal, attn_mask=mask, key_lengths=lengths)
    else:
        # top-left alignment is reachable through the op (and the SDPA drop-in)
        out, lse = OPS.flash_attention_forward(q, k, v, True, False, 24 ** -0.5, mask.unsqueeze(0)[0], lengths)
        out_e, lse_e = ref.flash_attention(q.double(), k.double(), v.double(), causal=True, bottom_right=False,
                                           attn_mask=mask, key_lengths=lengths)
        testing.assert_close(out, out_e, torch.float64, 1.0, "out")


@pytest.mark.parametrize("lengths", [[389, 200, 1, 0], [64, 128, 129, 383]])
def test_key_lengths(lengths):
    torch.manual_seed(2)
    q, k, v = make(4, 2, 1, 131, 389, 32)
    check_flash(q, k, v, key_lengths=torch.tensor(lengths))


def test_key_lengths_of_zero_give_zero_rows_and_gradients():
    q, k, v = make(2, 2, 2, 9, 13, 8)
    out, lse = seqkernels.flash_attention(q, k, v, key_lengths=torch.tensor([0, 13]), return_lse=True)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.all(dq[0] == 0) and torch.all(dk[0] == 0) and torch.all(dv[0] == 0)
    assert not any(torch.isnan(g).any() for g in (dq, dk, dv))


def test_fully_masked_rows_give_zeros_not_nan():
    q, k, v = make(1, 2, 2, 7, 11, 8)
    mask = torch.ones(7, 11, dtype=torch.bool)
    mask[3] = False
    fmask = torch.zeros(7, 11, dtype=torch.float64)
    fmask[5] = float("-inf")
    for m in (mask, fmask):
        check_flash(q, k, v, attn_mask=m)
        out = seqkernels.flash_attention(q, k, v, attn_mask=m)
        row = 3 if m.dtype == torch.bool else 5
        assert torch.all(out[:, :, row] == 0)


def test_mask_is_read_through_strides_not_copied():
    """A transposed (non-contiguous) and an expanded mask give the same answer as their copies."""
    q, k, v = make(2, 2, 2, 37, 41, 8)
    base = torch.rand(2, 1, 41, 37) > 0.4
    t = base.transpose(-1, -2)
    expanded = (torch.rand(1, 1, 1, 41) > 0.5).expand(2, 2, 37, 41)
    for m in (t, expanded):
        a = seqkernels.flash_attention(q, k, v, attn_mask=m)
        b = seqkernels.flash_attention(q, k, v, attn_mask=m.contiguous())
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["bool", "lengths"])
def test_float32_padding(kind):
    torch.manual_seed(3)
    q, k, v = make(2, 4, 4, 257, 520, 64, dtype=torch.float32)
    lengths = torch.tensor([260, 17])
    if kind == "bool":
        check_flash(q, k, v, attn_mask=(torch.arange(520) < lengths[:, None]).reshape(2, 1, 1, 520))
    else:
        check_flash(q, k, v, key_lengths=lengths)


def test_skipped_tiles_do_not_change_the_answer():
    """A padding mask whose hidden tiles the kernel skips equals the same mask with one key
    kept in each tile (so nothing can be skipped), up to the kept keys' contribution."""
    torch.manual_seed(4)
    q, k, v = make(1, 1, 1, 300, 800, 16, dtype=torch.float32)
    pad = torch.arange(800) < 100
    a = seqkernels.flash_attention(q, k, v, attn_mask=pad)
    b = seqkernels.flash_attention(q, k, v, key_lengths=torch.tensor([100]))
    c = seqkernels.flash_attention(q[..., :, :], k[:, :, :100], v[:, :, :100])
    torch.testing.assert_close(a, c, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(b, c, rtol=2e-5, atol=2e-5)


# --- dropout ---------------------------------------------------------------------------------

def test_philox_known_answer():
    """Random123's known-answer vector for Philox4x32-10: counter 0, key 0."""
    words = ref.philox4x32_10(torch.tensor([0]), 0)
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_matches_reference_with_the_same_mask(causal, p):
    torch.manual_seed(5)
    q, k, v = make(2, 4, 2, 131, 389, 16)
    check_flash(q, k, v, causal=causal, dropout_p=p, attn_mask=torch.rand(2, 1, 131, 389) > 0.2)


def test_dropout_float32_with_key_lengths():
    torch.manual_seed(6)
    q, k, v = make(2, 2, 1, 257, 300, 32, dtype=torch.float32)
    check_flash(q, k, v, dropout_p=0.3, key_lengths=torch.tensor([300, 77]))


def test_dropout_keep_fraction():
    """The fraction kept over 4 * 2 * 128 * 640 = 655360 draws is 1 - p within 5 sigma."""
    shape = (4, 2, 128, 640)
    n = math.prod(shape)
    for p, seed in ((0.1, 1), (0.5, 2), (0.9, 3)):
        kept = ref.dropout_keep_mask(shape, p, seed).double().mean().item()
        assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), (p, kept)


def test_dropout_expected_value_is_the_undropped_output():
    """Averaged over 400 seeds, the dropped output approaches the plain one (5 sigma of the mean)."""
    torch.manual_seed(8)
    q, k, v = (t.detach() for t in make(1, 1, 1, 5, 7, 4))
    plain = seqkernels.flash_attention(q, k, v)
    runs = torch.stack([seqkernels.flash_attention(q, k, v, dropout_p=0.4) for _ in range(400)])
    sem = runs.std(0) / math.sqrt(runs.shape[0])
    assert torch.all((runs.mean(0) - plain).abs() <= 5 * sem + 1e-12)


def test_dropout_is_reproducible_from_the_seed_and_changes_with_it():
    q, k, v = (t.detach() for t in make(1, 2, 2, 33, 45, 8))
    torch.manual_seed(11)
    a = seqkernels.flash_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(11)
    b = seqkernels.flash_attention(q, k, v, dropout_p=0.5)
    c = seqkernels.flash_attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dropout_offset_shifts_the_stream():
    """rng_state = [seed, offset] indexes the stream in Philox blocks: a row of 8 keys uses
    two blocks, so offset 6 starts three rows later."""
    q, k, v = (t.detach() for t in make(1, 1, 1, 3, 8, 4))
    full = ref.dropout_keep_mask((1, 1, 6, 8), 0.5, 123)
    for offset, rows in ((0, slice(0, 3)), (6, slice(3, 6))):
        out, _ = OPS.flash_attention_forward(q, k, v, False, True, 0.5, None, None, 0.5, torch.tensor([123, offset]))
        out_e, _ = ref.flash_attention(q, k, v, scale=0.5, dropout_p=0.5, dropout_mask=full[:, :, rows])
        testing.assert_close(out, out_e, torch.float64)


def test_dropout_one_gives_zeros():
    q, k, v = make(1, 2, 2, 5, 6, 4)
    out = seqkernels.flash_attention(q, k, v, dropout_p=1.0)
    assert torch.all(out == 0)
    out.sum().backward()
    assert torch.all(q.grad == 0)


def test_gradcheck_with_mask_lengths_and_dropout():
    torch.manual_seed(9)
    q, k, v = make(1, 2, 1, 5, 7, 3)
    mask = torch.rand(1, 2, 5, 7) > 0.3
    rng = torch.tensor([77, 0])

    def f(q, k, v):
        return OPS.flash_attention_forward(q, k, v, True, True, 0.4, mask, torch.tensor([6]), 0.3, rng)[0]

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_opcheck_with_the_new_arguments():
    q, k, v = (t.detach() for t in make(2, 2, 1, 9, 13, 8))
    for args in [
        (q, k, v, False, True, 0.3, torch.rand(2, 1, 9, 13) > 0.3, None, 0.0, None),
        (q, k, v, True, False, 0.3, torch.randn(1, 2, 1, 13, dtype=torch.float64), torch.tensor([13, 4]), 0.2,
         torch.tensor([5, 0])),
    ]:
        torch.library.opcheck(OPS.flash_attention_forward, args)
        out, lse = OPS.flash_attention_forward(*args)
        torch.library.opcheck(OPS.flash_attention_backward, (torch.randn_like(out), None, *args[:3], out, lse,
                                                              *args[3:]))


def test_opcheck_with_strided_inputs():
    """Heads as transposed views (how MultiheadAttention passes them): the fake kernels must
    describe the kernels' contiguous outputs, or compiled backward graphs break."""
    x = torch.randn(2, 9, 3, 8, dtype=torch.float64)
    q = k = v = x.transpose(1, 2)
    args = (q, k, v, False, True, 0.3, torch.rand(2, 1, 1, 9) > 0.3, None, 0.0, None)
    torch.library.opcheck(OPS.flash_attention_forward, args)
    out, lse = OPS.flash_attention_forward(*args)
    torch.library.opcheck(OPS.flash_attention_backward, (torch.randn_like(out), None, q, k, v, out, lse, *args[3:]))


def test_torch_compile_with_mask_and_dropout():
    q, k, v = make(2, 2, 2, 17, 19, 8, dtype=torch.float32)
    mask = torch.rand(2, 1, 17, 19) > 0.3

    def f(q, k, v):
        return seqkernels.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.25)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    a = compiled(q, k, v)
    ga = torch.autograd.grad(a.sum(), (q, k, v))
    torch.manual_seed(3)
    b = f(q, k, v)
    gb = torch.autograd.grad(b.sum(), (q, k, v))
    torch.testing.assert_close(a, b)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)


def test_mask_requiring_grad_through_the_op_is_refused():
    q, k, v = make(1, 1, 1, 4, 5, 4)
    mask = torch.zeros(4, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="attn_mask"):
        OPS.flash_attention_forward(q, k, v, False, True, 0.5, mask[None, None])


@pytest.mark.parametrize("kw,exc,match", [
    (dict(attn_mask=torch.ones(3, 5, 7, dtype=torch.bool)), ValueError, "attn_mask"),
    (dict(attn_mask=torch.ones(5, 7, dtype=torch.int32)), TypeError, "attn_mask"),
    (dict(attn_mask=torch.ones(1, 1, 1, 5, 7, dtype=torch.bool)), ValueError, "attn_mask"),
    (dict(key_lengths=torch.tensor([7.0, 7.0])), TypeError, "key_lengths"),
    (dict(key_lengths=torch.tensor([7])), ValueError, "key_lengths"),
    (dict(key_lengths=torch.tensor([8, 1])), ValueError, "key_lengths"),
    (dict(key_lengths=torch.tensor([-1, 1])), ValueError, "key_lengths"),
    (dict(dropout_p=1.5), ValueError, "dropout_p"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p"),
])
def test_bad_mask_arguments(kw, exc, match):
    q, k, v = make(2, 2, 2, 5, 7, 4)
    with pytest.raises(exc, match=match):
        seqkernels.flash_attention(q, k, v, **kw)


# --- the scaled_dot_product_attention drop-in against torch's own ----------------------------

def _sdpa_both(shapes, dtype=torch.float64, **kw):
    torch.manual_seed(12)
    ins = [torch.randn(*s, dtype=dtype, requires_grad=True) for s in shapes]
    a = seqkernels.scaled_dot_product_attention(*ins, **kw)
    e = F.scaled_dot_product_attention(*ins, **kw)
    ga, ge = grads([a], ins), grads([e], ins)
    return a, e, ga, ge


SDPA_CASES = [
    ("rank3", [(3, 37, 16), (3, 41, 16), (3, 41, 8)], {}),
    ("rank3-causal", [(3, 37, 16), (3, 41, 16), (3, 41, 8)], dict(is_causal=True)),
    ("rank4-causal-Lq>Lk", [(2, 4, 41, 16), (2, 4, 37, 16), (2, 4, 37, 16)], dict(is_causal=True)),
    ("rank5-mask4", [(2, 3, 4, 37, 16), (2, 3, 4, 41, 16), (2, 3, 4, 41, 16)], dict(mask=(3, 1, 37, 41))),
    ("rank5-mask5", [(2, 3, 4, 37, 16), (2, 3, 4, 41, 16), (2, 3, 4, 41, 16)], dict(mask=(2, 1, 4, 1, 41))),
    ("mask2", [(2, 4, 37, 16), (2, 4, 41, 16), (2, 4, 41, 16)], dict(mask=(37, 41))),
    ("mask3", [(2, 4, 37, 16), (2, 4, 41, 16), (2, 4, 41, 16)], dict(mask=(4, 1, 41))),
    ("padding", [(2, 4, 37, 16), (2, 4, 41, 16), (2, 4, 41, 16)], dict(mask=(2, 1, 1, 41))),
    ("gqa", [(2, 6, 37, 16), (2, 2, 41, 16), (2, 2, 41, 16)], dict(enable_gqa=True, mask=(2, 1, 37, 41))),
    ("gqa-causal", [(2, 6, 37, 16), (2, 3, 37, 16), (2, 3, 37, 16)], dict(enable_gqa=True, is_causal=True)),
    ("scale", [(2, 4, 37, 16), (2, 4, 41, 16), (2, 4, 41, 16)], dict(scale=0.37, mask=(37, 41))),
]


SDPA_PARAMS = [pytest.param(shapes, kw, kind, id=f"{name}-{kind}") for name, shapes, kw in SDPA_CASES
               for kind in (["bool", "float"] if "mask" in kw else ["none"])]


@pytest.mark.parametrize("shapes,kw,kind", SDPA_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sdpa_matches_torch(shapes, kw, kind, dtype):
    kw = dict(kw)
    if "mask" in kw:
        shape = kw.pop("mask")
        torch.manual_seed(13)
        if kind == "bool":
            kw["attn_mask"] = torch.rand(shape) > 0.25
        else:
            kw["attn_mask"] = torch.randn(shape, dtype=dtype)
    a, e, ga, ge = _sdpa_both(shapes, dtype, **kw)
    assert a.shape == e.shape
    testing.assert_close(a, e, dtype, 2.0, "out")
    for x, y in zip(ga, ge):
        testing.assert_close(x, y, dtype, 8.0, "grad")


def test_sdpa_fully_masked_rows_match_torch():
    m = torch.rand(2, 1, 37, 41) > 0.5
    m[:, :, 5] = False
    a, e, ga, ge = _sdpa_both([(2, 4, 37, 16), (2, 4, 41, 16), (2, 4, 41, 16)], attn_mask=m)
    testing.assert_close(a, e, torch.float64)
    for x, y in zip(ga, ge):
        testing.assert_close(x, y, torch.float64)


def test_sdpa_float_mask_gradient_matches_torch():
    torch.manual_seed(14)
    q, k, v = (torch.randn(2, 3, 9, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.randn(3, 9, 9, dtype=torch.float64, requires_grad=True)
    a = seqkernels.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    e = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    testing.assert_close(a, e, torch.float64)
    for x, y in zip(grads([a], (q, k, v, mask)), grads([e], (q, k, v, mask))):
        testing.assert_close(x, y, torch.float64)


def test_sdpa_float_mask_gradient_with_dropout_uses_the_kernel_stream():
    """The materialized path (a float mask that requires grad) draws the same Philox mask."""
    torch.manual_seed(16)
    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.randn(9, 9, dtype=torch.float64, requires_grad=True)
    state = torch.random.get_rng_state()
    a = seqkernels.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.4)
    keep = kernel_keep_mask(state, (1, 2, 9, 9), 0.4)
    e = ref.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.4, dropout_mask=keep)
    testing.assert_close(a, e, torch.float64)
    for x, y in zip(grads([a], (q, k, v, mask)), grads([e], (q, k, v, mask))):
        testing.assert_close(x, y, torch.float64)


def test_sdpa_dropout_matches_reference_with_the_kernel_mask():
    torch.manual_seed(15)
    q, k, v = (torch.randn(2, 4, 37, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    state = torch.random.get_rng_state()
    a = seqkernels.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True)
    keep = kernel_keep_mask(state, (2, 4, 37, 37), 0.3)
    e = ref.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True, dropout_mask=keep)
    testing.assert_close(a, e, torch.float64)
    for x, y in zip(grads([a], (q, k, v)), grads([e], (q, k, v))):
        testing.assert_close(x, y, torch.float64)


@pytest.mark.parametrize("call,exc,match", [
    (lambda q, k, v: seqkernels.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool),
                                                             is_causal=True), RuntimeError, "is_causal"),
    (lambda q, k, v: seqkernels.scaled_dot_product_attention(q, k[:, :2], v[:, :2]), ValueError, "enable_gqa"),
    (lambda q, k, v: seqkernels.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(6, 7, dtype=torch.bool)),
     ValueError, "attn_mask"),
    (lambda q, k, v: seqkernels.scaled_dot_product_attention(q[0, 0, 0], k[0, 0, 0], v[0, 0, 0]), ValueError,
     "query"),
    (lambda q, k, v: seqkernels.scaled_dot_product_attention(q, k[None], v[None]), ValueError, "rank"),
    (lambda q, k, v: seqkernels.scaled_dot_product_attention(q, torch.cat([k, k[:1]]), torch.cat([v, v[:1]])),
     ValueError, "broadcast"),
    (lambda q, k, v: seqkernels.scaled_dot_product_attention(q, k, v, dropout_p=2.0), ValueError, "dropout_p"),
    (lambda q, k, v: seqkernels.scaled_dot_product_attention(q, k, v.float()), TypeError, "dtype"),
])
def test_sdpa_bad_input(call, exc, match):
    q, k, v = (torch.randn(2, 4, n, 8, dtype=torch.float64) for n in (5, 7, 7))
    with pytest.raises(exc, match=match):
        call(q, k, v)
