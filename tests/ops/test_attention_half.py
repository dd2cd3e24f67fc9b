"""bf16 / fp16 attention on the CPU: the ops take half-precision q, k, v themselves.

fp32 accumulation, fp32 LSE, the output and gradients rounded once; the decode regime reads
half-precision K/V in place. Accuracy by flash-attn's rule: the error against float64 is at
most twice torch's own error in the same dtype (torch's SDPA on the same rounded inputs).
"""

import math

import pytest
import torch

import seqkernels
from seqkernels import reference as ref
from seqkernels import testing

OPS = torch.ops.seqkernels
HALF = [torch.bfloat16, torch.float16]


def inputs(B, H, Hk, Lq, Lk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, L, D, generator=g, dtype=torch.float64).to(dtype)
            for h, L in ((H, Lq), (Hk, Lk), (Hk, Lk))]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def grads(fn, q, k, v, go):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(go.to(out.dtype))
    return [out, q.grad, k.grad, v.grad]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", [(1, 4, 2, 131, 389, 64), (2, 8, 2, 1, 300, 64), (1, 2, 2, 67, 67, 40)],
                         ids=["general", "decode", "square"])
@pytest.mark.parametrize("causal", [False, True])
def test_error_at_most_twice_torchs(dtype, shape, causal):
    B, H, Hk, Lq, Lk, D = shape
    q, k, v = inputs(*shape, dtype)
    go = torch.randn(B, H, Lq, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    G = H // Hk
    expand = lambda t: t.repeat_interleave(G, dim=1)  # noqa: E731
    # torch's SDPA is top-left causal; the shapes here with Lq < Lk use bottom-right, so give
    # torch and the reference the same explicit mask
    mask = ref.causal_mask(Lq, Lk, bottom_right=True) if causal else None
    torch_fn = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        q, expand(k), expand(v), attn_mask=mask)
    ours_fn = lambda q, k, v: seqkernels.flash_attention(q, k, v, causal=causal)  # noqa: E731
    ref_fn = lambda q, k, v: ref.flash_attention(q, k, v, causal=causal)[0]  # noqa: E731
    exact = grads(ref_fn, *(t.double() for t in (q, k, v)), go)
    with testing.poison_outputs():
        ours = grads(ours_fn, q, k, v, go)
    theirs = grads(torch_fn, q, k, v, go)
    assert ours[0].dtype == dtype and all(g.dtype == dtype for g in ours[1:])
    for name, o, t, e in zip(("out", "dq", "dk", "dv"), ours, theirs, exact):
        eo, et = max_err(o, e), max_err(t, e)
        assert eo <= 2 * et + 1e-3 * e.abs().max().item(), f"{name}: ours {eo:.3g} vs torch {et:.3g}"


@pytest.mark.parametrize("dtype", HALF)
def test_op_returns_half_output_and_fp32_lse(dtype):
    q, k, v = inputs(1, 4, 2, 19, 33, 16, dtype)
    out, lse = OPS.flash_attention_forward(q, k, v, True, True, 0.25)
    assert out.dtype == dtype and lse.dtype == torch.float32
    exp_out, exp_lse = ref.flash_attention(q.double(), k.double(), v.double(), causal=True, scale=0.25)
    testing.assert_close(out, exp_out)
    testing.assert_close(lse, exp_lse.float())


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("Lq", [1, 9], ids=["decode", "general"])
def test_opcheck_half(dtype, Lq):
    q, k, v = inputs(1, 4, 2, Lq, 13, 8, dtype)
    torch.library.opcheck(OPS.flash_attention_forward, (q, k, v, True, True, 0.3))
    out, lse = OPS.flash_attention_forward(q, k, v, True, True, 0.3)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    torch.library.opcheck(OPS.flash_attention_backward, (go, gl, q, k, v, out, lse, True, True, 0.3))


@pytest.mark.parametrize("dtype", HALF)
def test_decode_regime_reads_half_kv_like_the_general_kernel(dtype):
    q, k, v = inputs(2, 8, 2, 2, 517, 64, dtype)
    mask = torch.rand(2, 1, 2, 517, generator=torch.Generator().manual_seed(3)) > 0.3
    lengths = torch.tensor([517, 200])
    with testing.decode_regime(False):
        general = seqkernels.flash_attention(q, k, v, causal=True, attn_mask=mask, key_lengths=lengths)
    decode = seqkernels.flash_attention(q, k, v, causal=True, attn_mask=mask, key_lengths=lengths)
    torch.testing.assert_close(decode.float(), general.float(), rtol=0, atol=2 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", HALF)
def test_float32_additive_mask_with_half_inputs(dtype):
    q, k, v = inputs(1, 2, 1, 23, 29, 16, dtype)
    mask = torch.randn(1, 1, 23, 29)
    out, _ = OPS.flash_attention_forward(q, k, v, False, True, 1 / math.sqrt(16), mask)
    exp = ref.flash_attention(q.double(), k.double(), v.double(), attn_mask=mask.double())[0]
    testing.assert_close(out, exp)
    with pytest.raises(RuntimeError, match="attn_mask must be bool or"):
        OPS.flash_attention_forward(q, k, v, False, True, 0.25, mask.double())


@pytest.mark.parametrize("dtype", HALF)
def test_backward_op_rejects_mixed_dtypes(dtype):
    q, k, v = inputs(1, 2, 1, 5, 7, 8, dtype)
    out, lse = OPS.flash_attention_forward(q, k, v, False, True, 0.3)
    with pytest.raises(RuntimeError, match="grad_out (and out )?must have"):
        OPS.flash_attention_backward(out.float(), None, q, k, v, out, lse, False, True, 0.3)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("Lq", [1, 70], ids=["decode", "general"])
def test_nan_reaches_the_outputs_torch_gives_nan(dtype, Lq):
    """A NaN in one key of one K/V head: every query row of the heads reading it is NaN, as in
    torch's SDPA in the same dtype; the other heads stay finite."""
    q, k, v = inputs(1, 4, 2, Lq, 131, 64, dtype)
    k[0, 1, 17, 3] = float("nan")
    ours = seqkernels.flash_attention(q, k, v)
    theirs = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    assert torch.equal(ours.isnan(), theirs.isnan())
    assert ours[:, 2:].isnan().all() and ours[:, :2].isfinite().all()
