"""Packed variable-length batches (flash_attention_varlen, flash-attn's layout) on the CPU
kernels: against the float64 reference one sequence at a time, against flash_attention on
each sequence alone, every option, the checks, opcheck and torch.compile."""

import pytest
import torch

import seqkernels
from seqkernels import reference as ref
from seqkernels import testing
from seqkernels.errors import ArgumentError, ArgumentTypeError
from seqkernels.profiling.timing import measure_times_interleaved

from .test_attention_masks import grads, kernel_keep_mask

OPS = torch.ops.seqkernels

# lengths 1, primes, empty sequences and one long sequence among short ones (past the
# forward's 256-row query blocks and 384-key tiles)
LENGTHS = {
    "ones": ([1, 1, 1], [1, 1, 1]),
    "primes": ([7, 13, 1, 31], [11, 13, 2, 29]),
    "long_among_short": ([3, 601, 1, 17], [5, 777, 2, 17]),
    "empty_sequences": ([0, 5, 9, 0], [4, 0, 9, 0]),
    "single": ([263], [263]),
}


def cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def make_packed(lq, lk, H=4, Hk=2, D=24, Dv=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), H, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    k = torch.randn(sum(lk), Hk, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    v = torch.randn(sum(lk), Hk, Dv, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return q, k, v, cu(lq), cu(lk), max(lq + [0]), max(lk + [0])


def check_varlen(q, k, v, cu_q, cu_k, max_q, max_k, tol_scale=1.0, dropout_p=0.0, **options):
    """flash_attention_varlen against the float64 reference: out, lse, dq, dk, dv."""
    state = torch.random.get_rng_state()
    out, lse = seqkernels.flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, return_lse=True,
                                                 dropout_p=dropout_p, **options)
    keep = None
    if dropout_p > 0:  # the counters of a (1, H, total_q, max_seqlen_k) batch
        keep = kernel_keep_mask(state, (1, q.shape[1], q.shape[0], max(max_k, 1)), dropout_p)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out_e, lse_e = ref.varlen_attention(q64, k64, v64, cu_q, cu_k, dropout_p=dropout_p, dropout_mask=keep, **options)
    dt = q.dtype
    assert out.shape == (q.shape[0], q.shape[1], v.shape[2]) and lse.shape == (q.shape[1], q.shape[0])
    testing.assert_close(out, out_e, dt, tol_scale, "out")
    fin = torch.isfinite(lse_e)
    assert torch.equal(torch.isfinite(lse), fin), "lse: -inf rows differ"
    testing.assert_close(lse[fin], lse_e[fin], torch.float32 if dt != torch.float64 else dt, tol_scale, "lse")
    if q.numel() and k.numel():
        for name, a, e in zip(("dq", "dk", "dv"), grads([out], (q, k, v)), grads([out_e], (q64, k64, v64))):
            testing.assert_close(a, e, dt, 4 * tol_scale, name)


@pytest.mark.parametrize("lengths", list(LENGTHS), ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_varlen_matches_reference(lengths, causal, dtype):
    check_varlen(*make_packed(*LENGTHS[lengths], dtype=dtype), causal=causal)


@pytest.mark.parametrize("options", [
    dict(window=(20, 0)), dict(window=(3, 5)), dict(softcap=1.3), dict(alibi_slopes="heads"),
    dict(alibi_slopes="batch"), dict(dropout_p=0.3),
    dict(window=(40, -1), softcap=2.0, alibi_slopes="heads", dropout_p=0.2),
], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_options(options, causal):
    lq, lk = LENGTHS["long_among_short"]
    options = dict(options)
    if options.get("alibi_slopes") == "heads":
        options["alibi_slopes"] = torch.rand(4)
    elif options.get("alibi_slopes") == "batch":
        options["alibi_slopes"] = torch.rand(len(lq), 4)
    check_varlen(*make_packed(lq, lk), causal=causal, **options)


@pytest.mark.parametrize("H, Hk, D, Dv", [(8, 1, 64, 64), (3, 3, 7, 5), (4, 2, 576, 512)])
def test_varlen_heads_and_head_dims(H, Hk, D, Dv):
    check_varlen(*make_packed([5, 130, 2], [9, 130, 40], H=H, Hk=Hk, D=D, Dv=Dv, dtype=torch.float32), causal=True,
                 tol_scale=2)


def test_varlen_equals_flash_attention_per_sequence():
    # every sequence of the packed batch gives what flash_attention gives it alone: the same
    # tiles, so the forward is bit for bit (with flash_attention's decode regime off, which
    # takes its one-row sequence otherwise), and the same gradients
    lq, lk = [300, 1, 45], [300, 20, 45]
    q, k, v, cq, ck, mq, mk = make_packed(lq, lk, dtype=torch.float32)
    out = seqkernels.flash_attention_varlen(q, k, v, cq, ck, mq, mk, causal=True)
    with testing.decode_regime(False):
        for b in range(3):
            qs, ks = slice(int(cq[b]), int(cq[b + 1])), slice(int(ck[b]), int(ck[b + 1]))
            qb, kb, vb = (t.detach()[s].transpose(0, 1)[None].requires_grad_() for t, s in ((q, qs), (k, ks), (v, ks)))
            ob = seqkernels.flash_attention(qb, kb, vb, causal=True)
            assert torch.equal(out[qs], ob[0].transpose(0, 1)), b
            go = torch.autograd.grad(out, q, torch.ones_like(out), retain_graph=True)[0][qs]
            gb = torch.autograd.grad(ob, qb, torch.ones_like(ob))[0][0].transpose(0, 1)
            torch.testing.assert_close(go, gb, rtol=1e-5, atol=1e-6)


def test_varlen_gradcheck():
    q, k, v, cq, ck, mq, mk = make_packed([2, 3, 1], [3, 1, 4], H=2, Hk=1, D=4, Dv=3)
    slopes = torch.tensor([0.5, 0.25])
    torch.autograd.gradcheck(
        lambda q, k, v: seqkernels.flash_attention_varlen(q, k, v, cq, ck, mq, mk, causal=True, softcap=2.0,
                                                          alibi_slopes=slopes), (q, k, v))


def test_varlen_lse_gradient():
    q, k, v, cq, ck, mq, mk = make_packed([5, 9], [7, 9])
    out, lse = seqkernels.flash_attention_varlen(q, k, v, cq, ck, mq, mk, return_lse=True)
    q64, k64, v64 = (t.detach().requires_grad_() for t in (q, k, v))
    out_e, lse_e = ref.varlen_attention(q64, k64, v64, cq, ck)
    for a, e in zip(grads([out, lse], (q, k, v)), grads([out_e, lse_e], (q64, k64, v64))):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_varlen_half_precisions_on_cpu(dtype):
    q, k, v, cq, ck, mq, mk = make_packed([5, 40], [9, 40], dtype=dtype)
    out = seqkernels.flash_attention_varlen(q, k, v, cq, ck, mq, mk, causal=True)
    assert out.dtype == dtype
    e, _ = ref.varlen_attention(q.double(), k.double(), v.double(), cq, ck, causal=True)
    testing.assert_close(out, e, dtype, 1.0, "out")


def test_varlen_empty_batch_and_all_dropped():
    q, k, v, cq, ck, mq, mk = make_packed([], [])
    out, lse = seqkernels.flash_attention_varlen(q, k, v, cq, ck, 0, 0, return_lse=True)
    assert out.shape == (0, 4, 16) and lse.shape == (4, 0)
    q, k, v, cq, ck, mq, mk = make_packed([3, 4], [3, 4])
    out = seqkernels.flash_attention_varlen(q, k, v, cq, ck, mq, mk, dropout_p=1.0)
    assert torch.equal(out, torch.zeros_like(out))


def _bad(**over):
    q, k, v, cq, ck, mq, mk = make_packed([3, 5], [4, 6])
    args = dict(q=q.detach(), k=k.detach(), v=v.detach(), cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=mq,
                max_seqlen_k=mk)
    args.update(over)
    return args


@pytest.mark.parametrize("over, exc, match", [
    (dict(q=torch.randn(2, 8, 4, 24, dtype=torch.float64)), ArgumentError, "q must be 3-D"),
    (dict(cu_seqlens_q=torch.tensor([0, 3, 8])), ArgumentTypeError, "cu_seqlens_q must be an int32"),
    (dict(cu_seqlens_k=torch.tensor([0, 10], dtype=torch.int32)), ArgumentError, "same length"),
    (dict(cu_seqlens_q=torch.tensor([1, 3, 8], dtype=torch.int32)), ArgumentError, r"cu_seqlens_q\[0\] must be 0"),
    (dict(cu_seqlens_k=torch.tensor([0, 6, 4], dtype=torch.int32)), ArgumentError, "non-decreasing"),
    (dict(cu_seqlens_q=torch.tensor([0, 3, 7], dtype=torch.int32)), ArgumentError, "number of rows given, 8"),
    (dict(max_seqlen_k=5), ArgumentError, "longer than max_seqlen 5"),
    (dict(max_seqlen_q=torch.tensor(5)), ArgumentTypeError, "max_seqlen_q must be an int"),
    (dict(max_seqlen_q=-1), ArgumentError, "max_seqlen_q must be >= 0"),
    (dict(v=torch.randn(11, 2, 16, dtype=torch.float64)), ArgumentError, "same number of rows"),
    (dict(alibi_slopes=torch.ones(3)), ArgumentError, "alibi_slopes"),
    (dict(window=(1, -2)), ArgumentError, "window"),
    (dict(dropout_p=1.5), ArgumentError, "dropout_p"),
])
def test_varlen_bad_arguments(over, exc, match):
    with pytest.raises(exc, match=match):
        seqkernels.flash_attention_varlen(**_bad(**over))


@pytest.mark.parametrize("cu_q, max_q, match", [
    ([1, 3, 8], 5, r"cu_seqlens_q\[0\] must be 0"),
    ([0, 6, 4], 6, "non-decreasing"),
    ([0, 3, 7], 5, "must be the number of rows given"),
    ([0, 3, 8], 4, "more than its max_seqlen"),
])
def test_varlen_direct_op_checks_values_in_cpp(cu_q, max_q, match):
    a = _bad()
    cq = torch.tensor(cu_q, dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        OPS.flash_attention_varlen_forward(a["q"], a["k"], a["v"], cq, a["cu_seqlens_k"], max_q, 6, False, 0.3)


def test_varlen_opcheck():
    q, k, v, cq, ck, mq, mk = make_packed([3, 9], [5, 9], dtype=torch.float32)
    q, k, v = (t.detach() for t in (q, k, v))
    args = (q, k, v, cq, ck, mq, mk, True, 0.3, 0.0, None, 1.5, 4, 0, torch.rand(4))
    torch.library.opcheck(OPS.flash_attention_varlen_forward, args)
    out, lse = OPS.flash_attention_varlen_forward(*args)
    torch.library.opcheck(OPS.flash_attention_varlen_backward, (torch.randn_like(out), torch.randn_like(lse), q, k, v,
                                                                out, lse) + args[3:])


def test_varlen_compile_does_not_recompile_per_batch():
    """Different packings of different totals reuse one compiled graph after the first
    shape change (dynamic shapes), with no .item() (the lengths stay in tensors and ints)."""
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v, cq, ck, mq, mk: seqkernels.flash_attention_varlen(q, k, v, cq, ck, mq, mk,
                                                                                         causal=True),
                      backend=backend, fullgraph=True)
    for n, lengths in enumerate(([3, 9], [7, 2, 11], [1, 1, 1, 30], [13, 4], [5])):
        q, k, v, cq, ck, mq, mk = make_packed(lengths, lengths, dtype=torch.float32, seed=n)
        out = f(q.detach(), k.detach(), v.detach(), cq, ck, mq, mk)
        e = seqkernels.flash_attention_varlen(q.detach(), k.detach(), v.detach(), cq, ck, mq, mk, causal=True)
        torch.testing.assert_close(out, e)
    assert len(compiles) <= 2, f"{len(compiles)} compilations for 5 batches"
    assert not any(n.target in (torch.ops.aten._local_scalar_dense.default,) for gm in compiles for n in gm.graph.nodes)


def test_float64_gpu_body_runs_the_exact_math():
    """float64 on CUDA (gradcheck) runs the reference one sequence at a time, with the
    kernels' dropout counters; device-agnostic, checked here against the CPU op (the other
    dtypes run the Triton kernels: tests/kernels)."""
    from seqkernels.ops import varlen as varlen_ops

    q, k, v, cq, ck, mq, mk = make_packed([3, 40, 1], [5, 40, 9])
    q, k, v = (t.detach() for t in (q, k, v))
    rng = torch.tensor([123, 64])
    args = (q, k, v, cq, ck, mq, mk, True, 0.3, 0.25, rng, 1.5, 8, 0, torch.rand(3, 4))
    out, lse = varlen_ops._fwd_cuda(*args)
    e_out, e_lse = OPS.flash_attention_varlen_forward(*args)
    testing.assert_close(out, e_out, torch.float64, 1.0, "out")
    testing.assert_close(lse, e_lse, torch.float64, 1.0, "lse")
    go = torch.randn_like(out)
    for a, e in zip(varlen_ops._bwd_cuda(go, None, q, k, v, out, lse, *args[3:]),
                    OPS.flash_attention_varlen_backward(go, None, q, k, v, e_out, e_lse, *args[3:])):
        testing.assert_close(a, e, torch.float64, 4.0, "grad")


def test_varlen_is_no_slower_than_the_padded_path():
    """The same sequences packed or padded to the longest with key_lengths: packing skips
    the padded query rows too, so it is at least as fast (bound 1.0x minus noise: 0.9x)."""
    lengths = [1900, 150, 700, 64, 1200, 30, 400, 900]
    H, D, L = 4, 64, max(lengths)
    q, k, v, cq, ck, mq, mk = make_packed(lengths, lengths, H=H, Hk=H, D=D, Dv=D, dtype=torch.float32)
    q, k, v = (t.detach() for t in (q, k, v))
    pad = [torch.zeros(len(lengths), H, L, D) for _ in range(3)]
    for b, n in enumerate(lengths):
        s = slice(int(cq[b]), int(cq[b + 1]))
        for p, t in zip(pad, (q, k, v)):
            p[b, :, :n] = t[s].transpose(0, 1)
    kl = torch.tensor(lengths)
    with torch.no_grad():
        t = measure_times_interleaved({
            "varlen": lambda: seqkernels.flash_attention_varlen(q, k, v, cq, ck, mq, mk, causal=True),
            "padded": lambda: seqkernels.flash_attention(*pad, causal=True, key_lengths=kl)}, warmup=1, repeat=5)
    assert t["varlen"].median_s < t["padded"].median_s / 0.9, {n: x.median_ms for n, x in t.items()}
