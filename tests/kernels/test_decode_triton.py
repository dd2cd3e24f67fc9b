"""The Triton flash-decoding kernels (kernels/decode.py) against the float64 reference:
contiguous and paged caches, GQA rows packed, split-K, appended rows, NaN.

Without a GPU they run under Triton's interpreter on CPU tensors at small sizes (float32
and float16; bfloat16 only on a GPU, where the interpreter's bf16 tl.dot is not an issue).
"""

from __future__ import annotations

import pytest
import torch

from seqkernels import reference as ref

D_ = pytest.importorskip("seqkernels.kernels.decode")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.interpreter if DEVICE == "cpu" else pytest.mark.gpu
DTYPES = [torch.float32, torch.float16] if DEVICE == "cpu" else [torch.float16, torch.bfloat16, torch.float32]


def _run(B, H, Hk, Lq, D, seqlens, Lnew, paged, dtype, causal=True, poison_q=False, **options):
    g = torch.Generator().manual_seed(B + H + Lq + Lnew + (paged or 0))
    if paged:
        per_seq = max((max(seqlens) + Lnew + paged - 1) // paged, 1)
        nb = B * per_seq + 2
        kc, vc = (torch.randn(nb, Hk, paged, D, generator=g) for _ in range(2))
        table = torch.randperm(nb, generator=g)[:B * per_seq].reshape(B, per_seq).to(torch.int32)
    else:
        Lmax = max(max(seqlens) + Lnew, 1)
        kc, vc = (torch.randn(B, Hk, Lmax, D, generator=g) for _ in range(2))
        table = None
    q = torch.randn(B, H, Lq, D, generator=g)
    if poison_q:
        q[0, 0, 0, 1] = float("nan")
    k, v = (torch.randn(B, Hk, Lnew, D, generator=g) for _ in range(2)) if Lnew else (None, None)
    sl = torch.tensor(seqlens, dtype=torch.int32)
    kc, vc, q = kc.to(dtype), vc.to(dtype), q.to(dtype)
    k = None if k is None else k.to(dtype)
    v = None if v is None else v.to(dtype)
    e, el, ek, ev = ref.kvcache_attention(q.double(), kc.double(), vc.double(), None if k is None else k.double(),
                                          None if v is None else v.double(), sl, table, causal, 0.3, **options)
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    kcd, vcd = dev(kc), dev(vc)
    window = options.get("window", (-1, -1))
    out, lse = D_.kvcache_attention(dev(q), kcd, vcd, dev(k), dev(v), dev(sl), dev(table), causal, 0.3,
                                    options.get("softcap", 0.0), window[0], window[1],
                                    dev(options.get("alibi_slopes")))
    assert torch.equal(kcd.cpu().double(), ek) and torch.equal(vcd.cpu().double(), ev)
    tol = 2e-5 if dtype == torch.float32 else 4e-3
    out, lse = out.cpu().double(), lse.cpu().double()
    assert torch.equal(torch.isnan(out), torch.isnan(e))
    torch.testing.assert_close(out.nan_to_num(), e.nan_to_num(), rtol=tol, atol=tol)
    fin = torch.isfinite(el)
    assert torch.equal(torch.isfinite(lse) | torch.isnan(lse), fin | torch.isnan(el))
    torch.testing.assert_close(lse[fin], el[fin], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G,Lq", [(1, 1), (4, 1), (4, 3), (8, 2)])
def test_contiguous(dtype, G, Lq):
    _run(3, 2 * G, 2, Lq, 32, (0, 19, 70), 1, None, dtype)


@pytest.mark.parametrize("block", [1, 16, 64])
def test_paged(block):
    _run(2, 8, 2, 2, 32, (5, 90), 3, block, torch.float32)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Lnew", [0, 5])
def test_new_keys_and_causal(causal, Lnew):
    _run(2, 4, 2, 4, 16, (0, 40), Lnew, None, torch.float32, causal=causal)


def test_head_dim_not_a_power_of_two_and_many_splits():
    _run(1, 4, 1, 1, 40, (700,), 1, None, torch.float32)  # one (batch, kv head): several splits


def test_nan_in_q_reaches_its_row():
    _run(2, 4, 2, 1, 16, (9, 30), 1, None, torch.float32, poison_q=True)


@pytest.mark.parametrize("bad", ["past the end", "block id"])
def test_the_op_body_checks_values_itself(bad):
    """The CUDA body re-checks the values (a compiled graph skips the Python checks) before
    it writes anything."""
    from seqkernels.ops.decode import _cuda

    q = torch.randn(2, 4, 1, 16).to(DEVICE)
    k, v = (torch.randn(2, 2, 1, 16).to(DEVICE) for _ in range(2))
    if bad == "past the end":
        kc, vc = (torch.randn(2, 2, 8, 16).to(DEVICE) for _ in range(2))
        sl, table = torch.tensor([3, 8], dtype=torch.int32).to(DEVICE), None
    else:
        kc, vc = (torch.randn(4, 2, 4, 16).to(DEVICE) for _ in range(2))
        sl, table = torch.tensor([3, 2], dtype=torch.int32).to(DEVICE), torch.tensor([[0, 1], [9, 2]],
                                                                                      dtype=torch.int32).to(DEVICE)
    before = kc.clone(), vc.clone()
    with pytest.raises(ValueError):
        _cuda(q, kc, vc, k, v, sl, table, True, 0.25)
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])


# --- softcap, windows, ALiBi (positions on each sequence's own length) -----------------------

@pytest.mark.parametrize("options", [dict(softcap=1.2), dict(window=(5, -1)), dict(window=(40, 0)),
                                     dict(window=(3, 2)), dict(alibi_slopes="heads"), dict(alibi_slopes="batch"),
                                     dict(softcap=2.0, window=(9, 0), alibi_slopes="heads")], ids=str)
@pytest.mark.parametrize("paged", [None, 16])
@pytest.mark.parametrize("causal", [True, False])
def test_softcap_window_alibi(options, paged, causal):
    options = dict(options)
    if options.get("alibi_slopes") == "heads":
        options["alibi_slopes"] = torch.rand(8)
    elif options.get("alibi_slopes") == "batch":
        options["alibi_slopes"] = torch.rand(3, 8)
    # sequences of 0, 17 and 300 keys (several splits), 2 query rows, GQA 4
    _run(3, 8, 2, 2, 32, [0, 17, 300], 2, paged, DTYPES[0], causal=causal, **options)


def test_op_body_runs_the_triton_kernel_with_options():
    """The CUDA body of the KV-cache op takes softcap, windows and ALiBi to the Triton
    decode kernel (here under the interpreter) and writes the caches as the CPU op does."""
    from seqkernels.ops import decode as decode_ops

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 2, 16, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    kc, vc = torch.randn(2, 2, 40, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g)
    sl = torch.tensor([7, 30], dtype=torch.int32)
    kc2, vc2 = kc.clone(), vc.clone()
    slopes = torch.rand(4)
    out, lse = decode_ops._cuda(q, kc, vc, k, v, sl, None, True, 0.25, 1.5, 9, 0, slopes)
    e_out, e_lse = torch.ops.seqkernels.flash_attention_kvcache(q, kc2, vc2, k, v, sl, None, True, 0.25, 1.5, 9, 0,
                                                                slopes)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2) and lse.dtype == torch.float32
    torch.testing.assert_close(out, e_out, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse, e_lse, rtol=2e-5, atol=2e-5)
