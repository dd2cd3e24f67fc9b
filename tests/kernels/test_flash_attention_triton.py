"""The Triton attention kernels against the float64 reference.

Without a GPU they run under Triton's interpreter (TRITON_INTERPRET=1, set in conftest)
on CPU tensors, in float32 and float16, at small sizes; bfloat16 only on a GPU (the
interpreter's bfloat16 tl.dot is wrong). Lengths cross the block sizes of the fixed config
(64 x 64 or 32 x 32 at head dim 256): 1, primes, unequal.
"""

import math

import pytest
import torch

from seqkernels import reference as ref
from seqkernels import testing

K = pytest.importorskip("seqkernels.kernels.flash_attention")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.interpreter if DEVICE == "cpu" else pytest.mark.gpu


def _run(B, H, Hk, Lq, Lk, D, Dv, causal, bottom_right, dtype, with_dlse=False, device=DEVICE):
    g = torch.Generator().manual_seed(Lq * 1000 + Lk)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q64, k64, v64 = mk(B, H, Lq, D), mk(B, Hk, Lk, D), mk(B, Hk, Lk, Dv)
    q, k, v = (t.to(device, dtype) for t in (q64, k64, v64))
    scale = 1 / math.sqrt(D)
    out, lse = K.forward(q, k, v, causal, bottom_right, scale)
    go64, gl64 = mk(B, H, Lq, Dv), mk(B, H, Lq)
    # the reference on the inputs as the kernel saw them (rounded to dtype)
    qr, kr, vr = (t.to(dtype).double().requires_grad_() for t in (q64, k64, v64))
    out_e, lse_e = ref.flash_attention(qr, kr, vr, causal=causal, scale=scale, bottom_right=bottom_right)
    fin = torch.isfinite(lse_e)
    outs, grads = [out_e], [go64]
    if with_dlse:
        outs.append(torch.where(fin, lse_e, torch.zeros_like(lse_e)))
        grads.append(torch.where(fin, gl64, torch.zeros_like(gl64)))
    ge = torch.autograd.grad(outs, (qr, kr, vr), grads)
    dlse = grads[1].to(device, torch.float32) if with_dlse else None
    ga = K.backward(go64.to(device, dtype), dlse, q, k, v, out, lse, causal, bottom_right, scale)
    tol = 4 if dtype == torch.float32 else 2
    testing.assert_close(out, out_e, dtype, tol, "out")
    assert torch.equal(torch.isfinite(lse).cpu(), fin), "rows without keys must have LSE -inf"
    testing.assert_close(lse[fin.to(lse.device)], lse_e[fin], torch.float32 if dtype == torch.float32 else dtype,
                         tol, "lse")
    for name, a, e in zip(("dq", "dk", "dv"), ga, ge):
        testing.assert_close(a, e, dtype, tol * 5, name)
    return out, ga


DTYPES = [torch.float32, torch.float16] if DEVICE == "cpu" else [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Lq,Lk", [(1, 1), (1, 67), (67, 1), (37, 131), (131, 37)])
@pytest.mark.parametrize("causal", [False, True])
def test_lengths_and_causal(dtype, Lq, Lk, causal):
    _run(1, 2, 2, Lq, Lk, 32, 32, causal, True, dtype)


@pytest.mark.parametrize("D,Dv", [(16, 16), (80, 80), (96, 64), (24, 40), (256, 256)])
def test_head_dims(D, Dv):
    _run(1, 2, 1, 37, 70, D, Dv, True, True, DTYPES[0])


@pytest.mark.parametrize("H,Hk", [(6, 2), (4, 1)])
def test_grouped_query_heads(H, Hk):
    _run(2, H, Hk, 29, 71, 16, 16, True, True, DTYPES[0])


def test_top_left_alignment():
    _run(1, 2, 2, 70, 29, 16, 16, True, False, DTYPES[0])
    _run(1, 2, 2, 29, 70, 16, 16, True, False, DTYPES[0])


def test_rows_without_keys_and_lse_gradient():
    out, (dq, dk, dv) = _run(1, 2, 1, 90, 20, 16, 16, True, True, DTYPES[0], with_dlse=True)
    assert torch.equal(out[:, :, :70].float().cpu(), torch.zeros(1, 2, 70, 16))
    assert torch.equal(dq[:, :, :70].float().cpu(), torch.zeros(1, 2, 70, 16))


def test_backward_is_deterministic():
    q, k, v = (torch.randn(1, 4, 70, 16, device=DEVICE, dtype=DTYPES[0]) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    out, lse = K.forward(q, k, v, True, True, 0.25)
    go = torch.randn_like(out)
    first = K.backward(go, None, q, k, v, out, lse, True, True, 0.25)
    again = K.backward(go, None, q, k, v, out, lse, True, True, 0.25)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_gpu_full_size_through_the_op(dtype, causal, D):
    """seqkernels.flash_attention on CUDA tensors at realistic sizes, forward and backward."""
    import seqkernels

    q = torch.randn(2, 8, 1031, D, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(2, 2, 2053, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(2, 2, 2053, D, device="cuda", dtype=dtype, requires_grad=True)
    out = seqkernels.flash_attention(q, k, v, causal=causal)
    exp = ref.flash_attention(q.double(), k.double(), v.double(), causal=causal)[0]
    testing.assert_close(out, exp, dtype, 2)
    go = torch.randn_like(out)
    ga = torch.autograd.grad(out, (q, k, v), go)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ge = torch.autograd.grad(ref.flash_attention(q64, k64, v64, causal=causal)[0], (q64, k64, v64), go.double())
    for a, e in zip(ga, ge):
        testing.assert_close(a, e, dtype, 10)
    again = torch.autograd.grad(seqkernels.flash_attention(q, k, v, causal=causal), (q, k, v), go)
    assert all(torch.equal(a, b) for a, b in zip(ga, again))


# --- masks, key lengths, dropout (the *_masked configs) --------------------------------------

def _run_masked(B, H, Hk, Lq, Lk, D, causal, bottom_right, dtype, mask=None, key_lengths=None, dropout_p=0.0,
                device=DEVICE, tol=None, softcap=0.0, window=(-1, -1), alibi_slopes=None, scale_inputs=1.0):
    """The kernels with the optional inputs against the float64 reference with the same
    mask, lengths, Philox dropout mask (seed 1234, offset 8), softcap, window and ALiBi."""
    g = torch.Generator().manual_seed(Lq * 1000 + Lk + 7)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q64, k64, v64 = mk(B, H, Lq, D) * scale_inputs, mk(B, Hk, Lk, D), mk(B, Hk, Lk, D)
    q, k, v = (t.to(device, dtype) for t in (q64, k64, v64))
    scale = 1 / math.sqrt(D)
    dmask = mask
    if mask is not None and mask.dtype != torch.bool:
        dmask = mask.to(dtype)
    args = dict(attn_mask=None if dmask is None else dmask.to(device),
                key_lengths=None if key_lengths is None else key_lengths.to(device),
                dropout_p=dropout_p, rng_state=torch.tensor([1234, 8]), softcap=softcap, window_left=window[0],
                window_right=window[1], alibi_slopes=None if alibi_slopes is None else alibi_slopes.to(device))
    out, lse = K.forward(q, k, v, causal, bottom_right, scale, **args)
    keep = ref.dropout_keep_mask((B, H, Lq, Lk), dropout_p, 1234, 8) if dropout_p else None
    qr, kr, vr = (t.to(dtype).double().requires_grad_() for t in (q64, k64, v64))
    rmask = None if dmask is None else (dmask if dmask.dtype == torch.bool else dmask.double())
    out_e, lse_e = ref.flash_attention(qr, kr, vr, causal=causal, scale=scale, bottom_right=bottom_right,
                                       attn_mask=rmask, key_lengths=key_lengths, dropout_p=dropout_p,
                                       dropout_mask=keep, softcap=softcap, window=window, alibi_slopes=alibi_slopes)
    go64 = mk(B, H, Lq, D)
    ge = torch.autograd.grad(out_e, (qr, kr, vr), go64)
    ga = K.backward(go64.to(device, dtype), None, q, k, v, out, lse, causal, bottom_right, scale, **args)
    tol = tol or (4 if dtype == torch.float32 else 2)
    testing.assert_close(out, out_e, dtype, tol, "out")
    fin = torch.isfinite(lse_e)
    assert torch.equal(torch.isfinite(lse).cpu(), fin), "rows without keys must have LSE -inf"
    for name, a, e in zip(("dq", "dk", "dv"), ga, ge):
        testing.assert_close(a, e, dtype, tol * 5, name)


MASKS = {
    "bool-full": lambda B, H, Lq, Lk: torch.rand(B, H, Lq, Lk, generator=torch.Generator().manual_seed(1)) > 0.3,
    "bool-padding": lambda B, H, Lq, Lk: (torch.arange(Lk) < torch.tensor([Lk, Lk // 3 + 1])[:B, None]
                                          ).reshape(B, 1, 1, Lk),
    "bool-rows": lambda B, H, Lq, Lk: (torch.rand(1, 1, Lq, 1, generator=torch.Generator().manual_seed(2)) > 0.2
                                       ),
    "float-heads": lambda B, H, Lq, Lk: torch.randn(1, H, 1, Lk, generator=torch.Generator().manual_seed(3),
                                                    dtype=torch.float64),
    "float-full": lambda B, H, Lq, Lk: torch.randn(B, 1, Lq, Lk, generator=torch.Generator().manual_seed(4),
                                                   dtype=torch.float64),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("causal", [False, True])
def test_attn_mask(dtype, mask, causal):
    B, H, Lq, Lk = 2, 4, 37, 71
    _run_masked(B, H, 2, Lq, Lk, 32, causal, True, dtype, mask=MASKS[mask](B, H, Lq, Lk))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal,bottom_right", [(False, True), (True, True), (True, False)])
def test_key_lengths(dtype, causal, bottom_right):
    _run_masked(3, 4, 1, 45, 83, 16, causal, bottom_right, dtype, key_lengths=torch.tensor([83, 20, 0]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_shares_the_philox_stream(dtype, causal):
    _run_masked(2, 2, 2, 33, 71, 16, causal, True, dtype, dropout_p=0.3)


@pytest.mark.parametrize("D", [64, 128, 256])
def test_everything_at_once_per_head_dim_class(D):
    """Mask, key lengths, dropout and GQA together, at each head-dim class's masked config."""
    B, H, Lq, Lk = 2, 4, 23, 41
    _run_masked(B, H, 2, Lq, Lk, D, True, True, DTYPES[0], mask=MASKS["bool-full"](B, H, Lq, Lk),
                key_lengths=torch.tensor([41, 30]), dropout_p=0.2)


# --- softcap, sliding windows, ALiBi ---------------------------------------------------------
# the fixed config's blocks are 64 x 64 (32 x 32 in float32): windows at block - 1, block,
# block + 1 and across several blocks, with both causal alignments

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_softcap(dtype, causal):
    # scores well past the cap (q scaled up), so that tanh saturates
    _run_masked(2, 4, 2, 37, 71, 32, causal, True, dtype, softcap=1.5, scale_inputs=4.0)


@pytest.mark.parametrize("window", [(0, 0), (31, 0), (32, -1), (33, 5), (63, 0), (64, 64), (-1, 3), (10, -1)])
@pytest.mark.parametrize("causal,bottom_right", [(False, True), (True, True), (True, False)])
def test_window(window, causal, bottom_right):
    _run_masked(1, 2, 1, 97, 163, 16, causal, bottom_right, DTYPES[0], window=window)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("causal,bottom_right", [(False, True), (True, True), (True, False)])
def test_alibi(dtype, per_batch, causal, bottom_right):
    slopes = torch.rand(2, 4) if per_batch else 2.0 ** -torch.arange(1, 5, dtype=torch.float32)
    _run_masked(2, 4, 2, 41, 67, 16, causal, bottom_right, dtype, alibi_slopes=slopes)


@pytest.mark.parametrize("D", [64, 256])
def test_every_feature_at_once(D):
    """Mask, key lengths, dropout, softcap, window and ALiBi together (the heaviest variant
    the AOT check compiles), with GQA."""
    B, H, Lq, Lk = 2, 4, 29, 53
    _run_masked(B, H, 2, Lq, Lk, D, True, True, DTYPES[0], mask=MASKS["bool-full"](B, H, Lq, Lk),
                key_lengths=torch.tensor([53, 40]), dropout_p=0.2, softcap=2.0, window=(20, 0),
                alibi_slopes=torch.rand(B, H), scale_inputs=2.0)


def test_masked_backward_is_deterministic():
    q, k, v = (torch.randn(2, 4, 70, 16, device=DEVICE, dtype=DTYPES[0]) for _ in range(3))
    args = dict(attn_mask=(torch.rand(2, 1, 70, 70) > 0.3).to(DEVICE), key_lengths=torch.tensor([70, 33], device=DEVICE),
                dropout_p=0.25, rng_state=torch.tensor([5, 0]))
    out, lse = K.forward(q, k, v, True, True, 0.25, **args)
    go = torch.randn_like(out)
    first = K.backward(go, None, q, k, v, out, lse, True, True, 0.25, **args)
    again = K.backward(go, None, q, k, v, out, lse, True, True, 0.25, **args)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_masked_sdpa_full_size(dtype, D):
    """The SDPA drop-in on CUDA with a padding mask, causal off, and dropout, at full size."""
    import seqkernels

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 8, 1031, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    pad = (torch.arange(1031, device="cuda") < torch.tensor([1031, 500], device="cuda")[:, None])[:, None, None]
    out = seqkernels.scaled_dot_product_attention(q, k, v, attn_mask=pad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    exp = ref.scaled_dot_product_attention(q64, k64, v64, attn_mask=pad)
    testing.assert_close(out, exp, dtype, 2)
    go = torch.randn_like(out)
    ga = torch.autograd.grad(out, (q, k, v), go)
    ge = torch.autograd.grad(exp, (q64, k64, v64), go.double())
    for a, e in zip(ga, ge):
        testing.assert_close(a, e, dtype, 10)
    _run_masked(2, 8, 2, 1031, 2053, D, True, True, dtype, mask=MASKS["bool-full"](2, 8, 1031, 2053),
                key_lengths=torch.tensor([2053, 999]), dropout_p=0.1, tol=3)


# --- packed batches (VARLEN) ------------------------------------------------------------------

def _run_varlen(lq, lk, dtype, causal=True, H=4, Hk=2, D=16, Dv=16, dropout_p=0.0, **features):
    g = torch.Generator().manual_seed(sum(lq) * 7 + sum(lk))
    cu = lambda n: torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32)  # noqa: E731
    cq, ck = cu(lq), cu(lk)
    q64 = torch.randn(sum(lq), H, D, generator=g, dtype=torch.float64)
    k64 = torch.randn(sum(lk), Hk, D, generator=g, dtype=torch.float64)
    v64 = torch.randn(sum(lk), Hk, Dv, generator=g, dtype=torch.float64)
    q, k, v = (t.to(DEVICE, dtype) for t in (q64, k64, v64))
    mq, mk = max(lq), max(lk)
    scale = 1 / math.sqrt(D)
    kw = dict(dropout_p=dropout_p, rng_state=torch.tensor([99, 4]), softcap=features.get("softcap", 0.0),
              window_left=features.get("window", (-1, -1))[0], window_right=features.get("window", (-1, -1))[1],
              alibi_slopes=None if features.get("alibi_slopes") is None else features["alibi_slopes"].to(DEVICE))
    out, lse = K.forward_varlen(q, k, v, cq.to(DEVICE), ck.to(DEVICE), mq, mk, causal, scale, **kw)
    keep = ref.dropout_keep_mask((1, H, sum(lq), mk), dropout_p, 99, 4) if dropout_p else None
    qr, kr, vr = (t.to(dtype).double().requires_grad_() for t in (q64, k64, v64))
    out_e, lse_e = ref.varlen_attention(qr, kr, vr, cq, ck, causal, scale, dropout_p=dropout_p, dropout_mask=keep,
                                        **features)
    go64 = torch.randn(out_e.shape, generator=g, dtype=torch.float64)
    ge = torch.autograd.grad(out_e, (qr, kr, vr), go64)
    ga = K.backward_varlen(go64.to(DEVICE, dtype), None, q, k, v, out, lse, cq.to(DEVICE), ck.to(DEVICE), mq, mk,
                           causal, scale, **kw)
    tol = 4 if dtype == torch.float32 else 2
    testing.assert_close(out, out_e, dtype, tol, "out")
    fin = torch.isfinite(lse_e)
    assert torch.equal(torch.isfinite(lse).cpu(), fin), "rows without keys must have LSE -inf"
    testing.assert_close(lse[fin.to(lse.device)], lse_e[fin], torch.float32, tol, "lse")
    for name, a, e in zip(("dq", "dk", "dv"), ga, ge):
        testing.assert_close(a, e, dtype, tol * 5, name)


# lengths 1, primes, empty sequences, one long sequence among short ones (past the fixed
# config's 64-row / 32-row blocks)
VARLEN_LENGTHS = [([1, 1, 1], [1, 1, 1]), ([7, 13, 1, 31], [11, 13, 2, 29]), ([3, 150, 1], [5, 170, 2]),
                  ([0, 5, 9, 0], [4, 0, 9, 3])]


@pytest.mark.parametrize("lengths", range(len(VARLEN_LENGTHS)))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen(lengths, causal, dtype):
    _run_varlen(*VARLEN_LENGTHS[lengths], dtype, causal=causal)


@pytest.mark.parametrize("features", [dict(window=(20, 0)), dict(softcap=1.5), dict(alibi_slopes="batch"),
                                      dict(dropout_p=0.3), dict(window=(9, 3), softcap=2.0, alibi_slopes="heads",
                                                                dropout_p=0.2)], ids=str)
def test_varlen_features(features):
    features = dict(features)
    if features.get("alibi_slopes") == "batch":
        features["alibi_slopes"] = torch.rand(3, 4)
    elif features.get("alibi_slopes") == "heads":
        features["alibi_slopes"] = torch.rand(4)
    dropout_p = features.pop("dropout_p", 0.0)
    _run_varlen([3, 150, 1], [5, 170, 2], DTYPES[0], dropout_p=dropout_p, **features)


def test_varlen_head_dims_and_heads():
    _run_varlen([5, 70], [9, 70], DTYPES[0], H=8, Hk=1, D=96, Dv=64)
