"""seqkernels.flash_attention and the seqkernels::flash_attention_* ops against the reference.

The CPU tests run the C++ kernel (csrc/attention/flash_attention_cpu.cpp). Shapes cross
every tile boundary of the kernel (forward 256 query rows x 384 keys, backward 128 x 64):
lengths 1, primes, and lengths just past a multiple of the tiles.
"""

import math

import pytest
import torch

import seqkernels
from seqkernels import reference as ref
from seqkernels import testing

OPS = torch.ops.seqkernels


def make(B, H, Hk, Lq, Lk, D, Dv=None, dtype=torch.float64, device="cpu", scale=1.0):
    Dv = Dv or D
    g = lambda *s: (torch.randn(*s, dtype=torch.float64) * scale).to(dtype).to(device).requires_grad_()  # noqa: E731
    return g(B, H, Lq, D), g(B, Hk, Lk, D), g(B, Hk, Lk, Dv)


def run_both(q, k, v, causal, scale=None, bottom_right=True, with_lse_grad=False):
    """Kernel and float64 reference: (outputs, grads) of each."""
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if bottom_right:
        out, lse = seqkernels.flash_attention(q, k, v, causal=causal, scale=scale, return_lse=True)
    else:
        out, lse = OPS.flash_attention_forward(q, k, v, causal, False, s)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out_e, lse_e = ref.flash_attention(q64, k64, v64, causal=causal, scale=s, bottom_right=bottom_right)
    gen = torch.Generator().manual_seed(7)
    go = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    gl = torch.randn(lse.shape, generator=gen, dtype=torch.float64)
    outs, outs_e, grads = [out], [out_e], [go.to(out.dtype)]
    if with_lse_grad:
        finite = torch.isfinite(lse_e)
        gl = torch.where(finite, gl, torch.zeros_like(gl))
        outs.append(lse)
        outs_e.append(torch.where(finite, lse_e, torch.zeros_like(lse_e)))
        grads.append(gl.to(lse.dtype))
    ga = torch.autograd.grad(outs, (q, k, v), grads)
    ge = torch.autograd.grad(outs_e, (q64, k64, v64), [go] + ([gl] if with_lse_grad else []))
    return (out, lse, ga), (out_e, lse_e, ge)


def check(q, k, v, causal, scale=None, bottom_right=True, tol_scale=1.0, with_lse_grad=False):
    (out, lse, ga), (out_e, lse_e, ge) = run_both(q, k, v, causal, scale, bottom_right, with_lse_grad)
    dt = q.dtype
    testing.assert_close(out, out_e, dt, tol_scale, "out")
    fin = torch.isfinite(lse_e)
    assert torch.equal(torch.isfinite(lse), fin), "lse: -inf rows differ"
    testing.assert_close(lse[fin], lse_e[fin], torch.float32 if dt != torch.float64 else dt, tol_scale, "lse")
    for name, a, e in zip(("dq", "dk", "dv"), ga, ge):
        testing.assert_close(a, e, dt, tol_scale * 4, name)


LENGTHS = [(1, 1), (1, 17), (17, 1), (13, 131), (131, 13), (257, 389), (300, 300)]


@pytest.mark.parametrize("Lq,Lk", LENGTHS)
@pytest.mark.parametrize("causal", [False, True])
def test_float64_matches_reference(Lq, Lk, causal):
    check(*make(2, 3, 3, Lq, Lk, 24, 17), causal)


@pytest.mark.parametrize("D", [16, 80, 96, 128, 256, 7])
def test_head_dims(D):
    check(*make(1, 2, 1, 67, 150, D), causal=True)


# past 256 (the forward's key tile shortens to 64) and Dv != D as MLA has it (192 / 128 and
# 576 / 512), through the forward, backward and decode regime
@pytest.mark.parametrize("D, Dv", [(257, 257), (512, 512), (192, 128), (576, 512), (300, 700), (1024, 64)])
@pytest.mark.parametrize("Lq", [1, 131])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_large_and_unequal_head_dims(D, Dv, Lq, dtype):
    check(*make(2, 4, 2, Lq, 150, D, Dv, dtype=dtype), causal=True, tol_scale=2)


@pytest.mark.parametrize("H,Hk", [(6, 2), (4, 1), (3, 3)])
@pytest.mark.parametrize("causal", [False, True])
def test_grouped_query_heads(H, Hk, causal):
    check(*make(2, H, Hk, 37, 71, 16), causal)


@pytest.mark.parametrize("Lq,Lk", [(5, 9), (9, 5), (130, 70)])
def test_top_left_alignment_through_the_op(Lq, Lk):
    check(*make(1, 2, 2, Lq, Lk, 16), causal=True, bottom_right=False)


def test_softmax_scale():
    check(*make(1, 2, 2, 33, 45, 16), causal=False, scale=0.07)


@pytest.mark.parametrize("Lq,Lk", [(1, 1), (131, 389), (257, 13)])
@pytest.mark.parametrize("causal", [False, True])
def test_float32(Lq, Lk, causal):
    check(*make(2, 4, 2, Lq, Lk, 64, dtype=torch.float32), causal, tol_scale=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precisions_on_cpu_compute_in_float32(dtype):
    q, k, v = make(1, 2, 1, 19, 41, 32, dtype=dtype)
    out = seqkernels.flash_attention(q, k, v, causal=True)
    assert out.dtype == dtype
    check(q, k, v, causal=True)


def test_rows_that_see_no_key_are_zero_with_zero_gradients():
    """Bottom-right causal with Lq > Lk: the first Lq - Lk queries see nothing."""
    q, k, v = make(1, 2, 1, 300, 40, 16)
    out, lse = seqkernels.flash_attention(q, k, v, causal=True, return_lse=True)
    assert torch.equal(out[:, :, :260], torch.zeros_like(out[:, :, :260]))
    assert torch.isneginf(lse[:, :, :260]).all() and torch.isfinite(lse[:, :, 260:]).all()
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert not any(torch.isnan(g).any() for g in (dq, dk, dv))
    assert torch.equal(dq[:, :, :260], torch.zeros_like(dq[:, :, :260]))
    check(q, k, v, causal=True)


def test_lse_is_differentiable():
    check(*make(1, 2, 2, 70, 90, 16), causal=True, with_lse_grad=True)
    check(*make(1, 2, 1, 90, 20, 16), causal=True, with_lse_grad=True)  # with empty rows


def test_large_logits_do_not_overflow():
    q, k, v = make(1, 2, 2, 100, 400, 32, dtype=torch.float32, scale=30.0)
    out = seqkernels.flash_attention(q, k, v)
    assert torch.isfinite(out).all()
    exp = ref.flash_attention(q.double(), k.double(), v.double())[0]
    # logits of order 1e3: float32 rounding of the scores (relative 6e-8 of ~900) sets the
    # error of the probabilities, ~1e-4; v is scaled by 30 too, so compare relative to 30
    torch.testing.assert_close(out.double() / 30, exp / 30, rtol=1e-3, atol=1e-3)


def test_strided_inputs():
    q = torch.randn(2, 16, 3, 8, dtype=torch.float64).transpose(1, 2)  # (2, 3, 16, 8), non-contiguous
    k = torch.randn(2, 20, 3, 8, dtype=torch.float64).transpose(1, 2)
    v = torch.randn(2, 20, 3, 8, dtype=torch.float64).transpose(1, 2)
    assert not q.is_contiguous()
    out = seqkernels.flash_attention(q, k, v, causal=True)
    testing.assert_close(out, ref.flash_attention(q, k, v, causal=True)[0])


@pytest.mark.parametrize("B,Hk,H", [(1, 1, 1), (3, 1, 2), (1, 1, 4), (2, 2, 2)])
def test_backward_is_deterministic(B, Hk, H):
    """Bitwise identical gradients on repeated calls, including the split-dQ path
    (taken when batch x kv heads cannot keep every thread busy)."""
    q, k, v = make(B, H, Hk, 200, 333, 32, dtype=torch.float32)
    go = torch.randn(B, H, 200, 32)
    first = torch.autograd.grad(seqkernels.flash_attention(q, k, v, causal=True), (q, k, v), go)
    for _ in range(3):
        again = torch.autograd.grad(seqkernels.flash_attention(q, k, v, causal=True), (q, k, v), go)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    check(q, k, v, causal=True, tol_scale=2)


def test_gradcheck():
    q, k, v = make(1, 2, 1, 5, 7, 4)
    assert torch.autograd.gradcheck(lambda q, k, v: seqkernels.flash_attention(q, k, v, causal=True), (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: seqkernels.flash_attention(q, k, v, return_lse=True)[1], (q, k, v))


@pytest.mark.parametrize("causal,bottom_right", [(False, True), (True, True), (True, False)])
def test_opcheck_forward(causal, bottom_right):
    q, k, v = make(1, 4, 2, 9, 13, 8, dtype=torch.float32)
    torch.library.opcheck(OPS.flash_attention_forward, (q, k, v, causal, bottom_right, 0.3))


def test_opcheck_backward():
    q, k, v = (t.detach() for t in make(1, 4, 2, 9, 13, 8, dtype=torch.float32))
    out, lse = OPS.flash_attention_forward(q, k, v, True, True, 0.3)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    torch.library.opcheck(OPS.flash_attention_backward, (go, gl, q, k, v, out, lse, True, True, 0.3))
    torch.library.opcheck(OPS.flash_attention_backward, (go, None, q, k, v, out, lse, True, True, 0.3))


def test_torch_compile_fullgraph():
    q, k, v = make(2, 4, 2, 21, 33, 16, dtype=torch.float32)

    def f(q, k, v):
        return seqkernels.flash_attention(q * 2, k, v, causal=True).sin()

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    exp = f(q, k, v)
    got = compiled(q, k, v)
    torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-6)
    g1 = torch.autograd.grad(got.sum(), (q, k, v))
    g2 = torch.autograd.grad(exp.sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# --- bad input: one test per documented error ------------------------------------------------

def _qkv(**over):
    d = dict(q=torch.randn(1, 4, 8, 16), k=torch.randn(1, 2, 9, 16), v=torch.randn(1, 2, 9, 16))
    d.update(over)
    return d["q"], d["k"], d["v"]


@pytest.mark.parametrize("over,exc,match", [
    (dict(q=torch.randn(4, 8, 16)), ValueError, "q must be 4-D"),
    (dict(k=torch.randn(1, 2, 9, 16, 1)), ValueError, "k must be 4-D"),
    (dict(k=torch.randn(1, 2, 9, 8)), ValueError, "head dims differ"),
    (dict(q=torch.randn(1, 4, 8, 1025), k=torch.randn(1, 2, 9, 1025), v=torch.randn(1, 2, 9, 16)), ValueError,
     "q/k head dim must be between 1 and 1024 on the CPU"),
    (dict(v=torch.randn(1, 2, 9, 1100)), ValueError, "v head dim"),
    # off the CPU, the GPU kernels' limit (checked before any kernel, here on meta tensors)
    (dict(q=torch.randn(1, 4, 8, 300, device="meta"), k=torch.randn(1, 2, 9, 300, device="meta"),
          v=torch.randn(1, 2, 9, 300, device="meta")), ValueError, "between 1 and 256 on meta"),
    (dict(k=torch.randn(1, 2, 9, 16, dtype=torch.float64)), TypeError, "same dtype"),
    (dict(q=torch.randint(0, 3, (1, 4, 8, 16))), TypeError, "q must be float16"),
    (dict(k=torch.randn(1, 3, 9, 16), v=torch.randn(1, 3, 9, 16)), ValueError, "multiple of the key/value heads"),
    (dict(v=torch.randn(1, 1, 9, 16)), ValueError, "same number of heads"),
    (dict(v=torch.randn(1, 2, 10, 16)), ValueError, "same length"),
    (dict(q=torch.randn(1, 4, 0, 16)), ValueError, "at least 1"),
    (dict(k=torch.randn(1, 2, 0, 16), v=torch.randn(1, 2, 0, 16)), ValueError, "at least 1"),
    (dict(k=torch.randn(2, 2, 9, 16)), ValueError, "batch sizes differ"),
    (dict(k=torch.randn(1, 2, 9, 16, device="meta")), ValueError, "same device"),
    (dict(q=[1, 2]), TypeError, "q must be a torch.Tensor"),
])
def test_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        seqkernels.flash_attention(*_qkv(**over))


def test_direct_op_call_with_bad_dtype_is_an_error_not_a_crash():
    q, k, v = (t.to(torch.int32) for t in _qkv())
    with pytest.raises(RuntimeError, match="dtype"):
        OPS.flash_attention_forward(q, k, v, False, True, 1.0)


# --- GPU ------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_matches_reference(dtype, causal):
    q, k, v = make(2, 4, 2, 131, 257, 64, dtype=dtype, device="cuda")
    out = seqkernels.flash_attention(q, k, v, causal=causal)
    exp = ref.flash_attention(q.double(), k.double(), v.double(), causal=causal)[0]
    testing.assert_close(out, exp, dtype, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_torch_compile_fullgraph(dtype):
    """The Triton path inside a compiled graph (inductor), with a padding mask: no graph
    break, the eager result, and the same gradients."""
    q, k, v = make(2, 4, 2, 131, 257, 64, dtype=dtype, device="cuda")
    pad = (torch.arange(257, device="cuda") < torch.tensor([257, 100], device="cuda")[:, None])[:, None, None]

    def f(q, k, v):
        return seqkernels.scaled_dot_product_attention(q * 2, k, v, attn_mask=pad, enable_gqa=True).sin()

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    exp, got = f(q, k, v), compiled(q, k, v)
    testing.assert_close(got, exp.double(), dtype, 2)
    for a, b in zip(torch.autograd.grad(got.float().sum(), (q, k, v)), torch.autograd.grad(exp.float().sum(), (q, k, v))):
        testing.assert_close(a, b.double(), dtype, 4)
