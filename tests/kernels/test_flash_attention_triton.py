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
