"""The fused recurrent ops (seqkernels::lstm_layer_*, rnn_layer_*) and functions against the reference.

Sizes are odd (hidden 7, 13, 37: not multiples of any vector width, so both the vector
body and the scalar tail of the CPU pointwise passes run), lengths include 1.
"""

import pytest
import torch

import seqkernels
from seqkernels import reference as ref
from seqkernels import testing
from tests.helpers import grads_of

OPS = torch.ops.seqkernels
D64 = torch.float64


def _weights(kind, I, H, layers=1, bidir=False, proj=0, bias=True, dtype=D64):
    if kind == "lstm":
        m = torch.nn.LSTM(I, H, num_layers=layers, bidirectional=bidir, proj_size=proj, bias=bias, dtype=dtype)
    else:
        m = torch.nn.RNN(I, H, num_layers=layers, bidirectional=bidir, bias=bias, dtype=dtype,
                         nonlinearity="relu" if kind == "relu" else "tanh")
    for p in m.parameters():  # larger than torch's init, so the gates leave their linear range
        torch.nn.init.uniform_(p, -0.6, 0.6)
    return m, ref.weights_from_module(m)


def _compare(kind, m, w, x, hx, lengths, layers, bidir, batch_first=False, dtype=D64, scale=1.0):
    kw = dict(num_layers=layers, bidirectional=bidir, batch_first=batch_first, lengths=lengths)
    if kind == "lstm":
        out, (h, c) = seqkernels.lstm(x, w, hx, **kw)
        w64 = [tuple(None if t is None else t.double() for t in ww) for ww in w]
        hx64 = None if hx is None else tuple(t.double() for t in hx)
        x64 = x.detach().double().requires_grad_()
        exp, (he, ce) = ref.lstm(x64, w64, hx64, **kw)
        got, want = [out, h, c], [exp, he, ce]
    else:
        nl = "relu" if kind == "relu" else "tanh"
        out, h = seqkernels.rnn(x, w, hx, nonlinearity=nl, **kw)
        w64 = [tuple(None if t is None else t.double() for t in ww) for ww in w]
        x64 = x.detach().double().requires_grad_()
        exp, he = ref.rnn(x64, w64, None if hx is None else hx.double(), nonlinearity=nl, **kw)
        got, want = [out, h], [exp, he]
    for n, (a, e) in enumerate(zip(got, want)):
        testing.assert_close(a, e, dtype, scale, f"output {n}")
    params = [t for t in m.parameters()]
    ga = grads_of(got, [x, *params])
    ge = grads_of(want, [x64, *[t for ww in w64 for t in ww if t is not None]])
    for n, (a, e) in enumerate(zip(ga, ge)):
        testing.assert_close(a, e, dtype, scale * 10, f"grad {n}")


CASES = [
    # (T, B, I, H, layers, bidir, proj, bias, lengths)
    (1, 1, 3, 7, 1, False, 0, True, None),
    (9, 3, 5, 13, 1, False, 0, True, None),
    (9, 4, 5, 13, 2, True, 0, True, [9, 1, 4, 9]),
    (7, 5, 37, 37, 2, True, 0, False, [7, 3, 1, 6, 2]),
    (11, 2, 17, 19, 1, True, 5, True, None),
    (11, 3, 17, 19, 2, True, 7, True, [2, 11, 5]),
]


@pytest.mark.parametrize("T,B,I,H,layers,bidir,proj,bias,lengths", CASES)
def test_lstm_float64_matches_reference(T, B, I, H, layers, bidir, proj, bias, lengths):
    m, w = _weights("lstm", I, H, layers, bidir, proj, bias)
    x = torch.randn(T, B, I, dtype=D64, requires_grad=True)
    Dn = 2 if bidir else 1
    hx = (torch.randn(layers * Dn, B, proj or H, dtype=D64), torch.randn(layers * Dn, B, H, dtype=D64))
    _compare("lstm", m, w, x, hx, None if lengths is None else torch.tensor(lengths), layers, bidir)


@pytest.mark.parametrize("kind", ["tanh", "relu"])
@pytest.mark.parametrize("T,B,I,H,layers,bidir,proj,bias,lengths", [c for c in CASES if c[6] == 0])
def test_rnn_float64_matches_reference(kind, T, B, I, H, layers, bidir, proj, bias, lengths):
    m, w = _weights(kind, I, H, layers, bidir, 0, bias)
    x = torch.randn(T, B, I, dtype=D64, requires_grad=True)
    hx = torch.randn(layers * (2 if bidir else 1), B, H, dtype=D64)
    _compare(kind, m, w, x, hx, None if lengths is None else torch.tensor(lengths), layers, bidir)


@pytest.mark.parametrize("B", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("H,proj", [(45, 0), (70, 0), (45, 13)])
def test_float32_small_batches(B, H, proj):
    """Batches up to 4 take the CPU's fused step (threads own blocks of 32 hidden units and
    compute their gate rows as matrix-vector products); 5 takes the GEMM path. H = 45 and
    70 leave partial unit blocks and vector tails; P = 13 a tail in the product's depth."""
    m, w = _weights("lstm", 37, H, 2, True, proj, True, dtype=torch.float32)
    x = torch.randn(11, B, 37, requires_grad=True)
    lengths = torch.tensor([11, 4, 1, 7, 11][:B]) if B > 1 else None
    _compare("lstm", m, w, x, None, lengths, 2, True, dtype=torch.float32, scale=5)


@pytest.mark.parametrize("B", [2, 5])
def test_float32_saturated_gates_and_nan(B):
    """Pre-activations of +-1e4: the CPU's float32 sigmoid (a reciprocal estimate and a
    Newton step, exp's argument capped) must give exactly 0 or 1, not inf * 0 = NaN; a NaN
    input must still come out as NaN in its own sequence only."""
    m, w = _weights("lstm", 5, 19, dtype=torch.float32)
    x = torch.randn(4, B, 5) * 1e4
    x[2, 1, 0] = float("nan")
    out, (h, c) = seqkernels.lstm(x, w)
    exp, _ = ref.lstm(x.double(), [tuple(None if t is None else t.double() for t in ww) for ww in w])
    finite = torch.ones(B, dtype=torch.bool)
    finite[1] = False
    assert out[:, finite].isfinite().all() and out[2:, 1].isnan().all()
    torch.testing.assert_close(out[:, finite], exp[:, finite].float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,proj", [("lstm", 0), ("lstm", 5), ("tanh", 0)])
def test_float32_batch_above_the_panel_kernel(kind, proj):
    """B = 263 is above the CPU's panel micro-kernel (256 rows): the step's products go to
    oneDNN, the backward's A W products through a transposed copy of W."""
    m, w = _weights(kind, 6, 9, 1, True, proj, True, dtype=torch.float32)
    x = torch.randn(3, 263, 6, requires_grad=True)
    _compare(kind, m, w, x, None, None, 1, True, dtype=torch.float32, scale=5)


@pytest.mark.parametrize("dtype", [D64, torch.float32])
@pytest.mark.parametrize("kind,proj", [("lstm", 0), ("lstm", 3), ("relu", 0)])
def test_backward_in_several_chunks(kind, proj, dtype):
    """The CPU backward keeps dZ for chunks of about 2048 rows (T*B here is 67*37 = 2479:
    two chunks of 34 and 33 steps, so the second is shorter). Bidirectional with lengths:
    the reverse direction's chunks start at the last step, the states before a chunk come
    from the other chunk, and h0 from the chunk that holds the first step."""
    T, B = 67, 37
    m, w = _weights(kind, 5, 7, 1, True, proj, True, dtype=dtype)
    x = torch.randn(T, B, 5, dtype=dtype, requires_grad=True)
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    if kind == "lstm":
        hx = (torch.randn(2, B, proj or 7, dtype=dtype), torch.randn(2, B, 7, dtype=dtype))
    else:
        hx = torch.randn(2, B, 7, dtype=dtype)
    _compare(kind, m, w, x, hx, lengths, 1, True, dtype=dtype, scale=5)


@pytest.mark.parametrize("kind", ["lstm", "tanh"])
def test_float32_matches_reference(kind):
    m, w = _weights(kind, 37, 45, 2, True, 0, True, dtype=torch.float32)
    x = torch.randn(23, 6, 37, requires_grad=True)
    _compare(kind, m, w, x, None, torch.tensor([23, 5, 1, 17, 23, 9]), 2, True, dtype=torch.float32, scale=5)


def test_batch_first_and_unbatched():
    m, w = _weights("lstm", 5, 7)
    x = torch.randn(3, 4, 5, dtype=D64, requires_grad=True)
    _compare("lstm", m, w, x, None, None, 1, False, batch_first=True)
    out, (h, c) = seqkernels.lstm(x[0], w)  # (T=4, I) unbatched
    exp, (he, ce) = ref.lstm(x[0], w)
    assert out.shape == (4, 7) and h.shape == (1, 7)
    testing.assert_close(out, exp)
    testing.assert_close(c, ce)


def test_cells_match_torch():
    cell = torch.nn.LSTMCell(11, 13, dtype=D64)
    x = torch.randn(5, 11, dtype=D64, requires_grad=True)
    hc = (torch.randn(5, 13, dtype=D64), torch.randn(5, 13, dtype=D64))
    h, c = seqkernels.lstm_cell(x, hc, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    he, ce = cell(x, hc)
    testing.assert_close(h, he)
    testing.assert_close(c, ce)
    for a, e in zip(grads_of([h, c], [x, *cell.parameters()]), grads_of([he, ce], [x, *cell.parameters()])):
        testing.assert_close(a, e)
    for nl in ("tanh", "relu"):
        rc = torch.nn.RNNCell(11, 13, nonlinearity=nl, dtype=D64)
        h = seqkernels.rnn_cell(x, hc[0], rc.weight_ih, rc.weight_hh, rc.bias_ih, rc.bias_hh, nonlinearity=nl)
        testing.assert_close(h, rc(x, hc[0]))
        h1 = seqkernels.rnn_cell(x[0], None, rc.weight_ih, rc.weight_hh, rc.bias_ih, rc.bias_hh, nonlinearity=nl)
        testing.assert_close(h1, rc(x[0]))


def test_steps_past_length_keep_state_and_zero_output():
    m, w = _weights("lstm", 3, 5, 1, True)
    x = torch.randn(6, 2, 3, dtype=D64)
    out, (h, c) = seqkernels.lstm(x, w, bidirectional=True, lengths=torch.tensor([6, 2]))
    assert torch.equal(out[2:, 1], torch.zeros_like(out[2:, 1]))
    # the sequence of length 2 gives what running it alone on its 2 steps gives
    out2, (h2, c2) = seqkernels.lstm(x[:2, 1:], w, bidirectional=True)
    testing.assert_close(out[:2, 1:], out2)
    testing.assert_close(h[:, 1:], h2)


def test_gradcheck_layers():
    m, w = _weights("lstm", 3, 4, 1, False, 2)
    x = torch.randn(4, 2, 3, dtype=D64, requires_grad=True)
    h0 = torch.randn(2, 2, dtype=D64, requires_grad=True)
    c0 = torch.randn(2, 4, dtype=D64, requires_grad=True)
    w_ih, w_hh, b_ih, b_hh, w_hr = w[0]
    lengths = torch.tensor([4, 2])

    def f(x, h0, c0, w_ih, w_hh, b, w_hr):
        y, hn, cn, *_ = OPS.lstm_layer_forward(x, h0, c0, w_ih, w_hh, b, w_hr, lengths, True)
        return y, hn, cn

    args = (x, h0, c0, w_ih.detach().requires_grad_(), w_hh.detach().requires_grad_(),
            (b_ih + b_hh).detach().requires_grad_(), w_hr.detach().requires_grad_())
    assert torch.autograd.gradcheck(f, args)
    r_ih, r_hh = torch.randn(4, 3, dtype=D64, requires_grad=True), torch.randn(4, 4, dtype=D64, requires_grad=True)

    def g(x, h0, w_ih, w_hh):
        y, hn, _ = OPS.rnn_layer_forward(x, h0, w_ih, w_hh, None, None, False, False)
        return y, hn

    assert torch.autograd.gradcheck(g, (x, torch.randn(2, 4, dtype=D64, requires_grad=True), r_ih, r_hh))


def _layer_args(proj, lengths):
    T, B, I, H = 5, 3, 4, 6
    P = proj or H
    x = torch.randn(T, B, I)
    args = (x, torch.randn(B, P), torch.randn(B, H), torch.randn(4 * H, I), torch.randn(4 * H, P), torch.randn(4 * H),
            torch.randn(P, H) if proj else None, torch.tensor([5, 1, 3]) if lengths else None, False)
    return args


@pytest.mark.parametrize("proj,lengths", [(0, False), (3, True)])
def test_opcheck_lstm(proj, lengths):
    args = _layer_args(proj, lengths)
    torch.library.opcheck(OPS.lstm_layer_forward, args)
    y, hn, cn, gates, hs, cs, rs = OPS.lstm_layer_forward(*args)
    x, h0, c0, w_ih, w_hh, b, w_hr, lens, rev = args
    torch.library.opcheck(OPS.lstm_layer_backward,
                          (torch.randn_like(y), torch.randn_like(hn), torch.randn_like(cn), x, h0, c0, w_ih, w_hh,
                           w_hr, lens, rev, gates, y, hs, cs, rs, True))


def test_opcheck_rnn():
    x, h0, w_ih, w_hh = torch.randn(5, 3, 4), torch.randn(3, 6), torch.randn(6, 4), torch.randn(6, 6)
    args = (x, h0, w_ih, w_hh, torch.randn(6), torch.tensor([5, 2, 1]), True, True)
    torch.library.opcheck(OPS.rnn_layer_forward, args)
    y, hn, hs = OPS.rnn_layer_forward(*args)
    torch.library.opcheck(OPS.rnn_layer_backward, (torch.randn_like(y), torch.randn_like(hn), x, h0, w_ih, w_hh,
                                                   args[5], True, True, y, hs, True))


def test_torch_compile_fullgraph():
    lstm = seqkernels.nn.LSTM(6, 8, num_layers=2, bidirectional=True)
    head = torch.nn.Linear(16, 3)

    def f(x):
        out, (h, c) = lstm(x)
        return head(out).tanh().sum(0)

    x = torch.randn(7, 4, 6)
    compiled = torch.compile(f, fullgraph=True)
    exp, got = f(x), compiled(x)
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
    ge = torch.autograd.grad(exp.sum(), list(lstm.parameters()))
    gg = torch.autograd.grad(compiled(x).sum(), list(lstm.parameters()))
    for a, b in zip(gg, ge):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --- bad input: one test per documented error ------------------------------------------------

def _lstm_call(**over):
    m, w = _weights("lstm", 4, 5, 2, False, dtype=torch.float32)
    kw = dict(input=torch.randn(3, 2, 4), weights=w, hx=None, num_layers=2, lengths=None)
    kw.update(over)
    return seqkernels.lstm(kw.pop("input"), kw.pop("weights"), kw.pop("hx"), **kw)


@pytest.mark.parametrize("over,exc,match", [
    (dict(input=torch.randn(3, 2, 4, 1)), ValueError, "input must be 2-D"),
    (dict(input=torch.randn(3, 2, 6)), ValueError, "input has 6 features"),
    (dict(input=torch.randn(3, 2, 4, dtype=torch.float64)), TypeError, "must have the input's dtype"),
    (dict(input=torch.randint(0, 2, (3, 2, 4))), TypeError, "floating-point"),
    (dict(input=torch.randn(3, 2, 4).half()), TypeError, "on the CPU the input must be float32, float64 or bfloat16"),
    (dict(input=torch.randn(0, 2, 4)), ValueError, "sequence length to be larger than 0"),
    (dict(num_layers=3), ValueError, "expected 3 weight tuples"),
    (dict(hx=(torch.randn(2, 2, 5), torch.randn(1, 2, 5))), ValueError, "c_0 must have shape"),
    (dict(hx=(torch.randn(2, 3, 5), torch.randn(2, 2, 5))), ValueError, "h_0 must have shape"),
    (dict(hx=torch.randn(2, 2, 5)), TypeError, "hx must be a tuple"),
    (dict(lengths=torch.tensor([3, 0])), ValueError, r"lengths must lie in \[1, 3\]"),
    (dict(lengths=torch.tensor([4, 1])), ValueError, r"lengths must lie in \[1, 3\]"),
    (dict(lengths=torch.tensor([3])), ValueError, "one entry per sequence"),
    (dict(lengths=torch.tensor([3.0, 1.0])), TypeError, "1-D integer tensor"),
])
def test_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        _lstm_call(**over)


def test_bad_input_device_and_nonlinearity():
    m, w = _weights("lstm", 4, 5, dtype=torch.float32)
    with pytest.raises(ValueError, match="device"):
        seqkernels.lstm(torch.randn(3, 2, 4), w, (torch.randn(1, 2, 5, device="meta"), torch.randn(1, 2, 5)))
    r, wr = _weights("tanh", 4, 5, dtype=torch.float32)
    with pytest.raises(ValueError, match="nonlinearity"):
        seqkernels.rnn(torch.randn(3, 2, 4), wr, nonlinearity="gelu")


def test_direct_op_call_with_bad_shapes_is_an_error_not_a_crash():
    with pytest.raises(RuntimeError, match="w_ih has 3 columns"):
        OPS.rnn_layer_forward(torch.randn(2, 1, 4), torch.randn(1, 5), torch.randn(5, 3), torch.randn(5, 5), None,
                              None, False, False)


# --- GPU ------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", ["lstm", "tanh"])
def test_gpu_matches_reference(dtype, kind):
    m, w = _weights(kind, 37, 45, 2, True, dtype=dtype)
    m = m.cuda()
    w = ref.weights_from_module(m)
    x = torch.randn(23, 6, 37, device="cuda", dtype=dtype, requires_grad=True)
    lengths = torch.tensor([23, 5, 1, 17, 23, 9])
    out = (seqkernels.lstm if kind == "lstm" else seqkernels.rnn)(x, w, num_layers=2, bidirectional=True,
                                                                  lengths=lengths)[0]
    w64 = [tuple(None if t is None else t.double().cpu() for t in ww) for ww in w]
    exp = (ref.lstm if kind == "lstm" else ref.rnn)(x.double().cpu(), w64, num_layers=2, bidirectional=True,
                                                    lengths=lengths)[0]
    testing.assert_close(out, exp, dtype, 10 if dtype in (torch.float16, torch.bfloat16) else 5)
    if dtype == torch.float64:
        g = torch.randn_like(out)
        ga = torch.autograd.grad(out, [x, *m.parameters()], g)
        xr = x.detach().cpu().requires_grad_()
        w64 = [tuple(None if t is None else t.detach().double().cpu().requires_grad_() for t in ww) for ww in w]
        e = (ref.lstm if kind == "lstm" else ref.rnn)(xr, w64, num_layers=2, bidirectional=True, lengths=lengths)[0]
        ge = torch.autograd.grad(e, [xr, *[t for ww in w64 for t in ww if t is not None]], g.cpu())
        for a, b in zip(ga, ge):
            testing.assert_close(a, b)


# --- inference path (workspace=False) ----------------------------------------------------------

@pytest.mark.parametrize("bidir,proj,lengths", [(False, 0, None), (True, 0, [9, 3, 1]), (True, 4, [2, 9, 9])])
@pytest.mark.parametrize("B", [3, 7])
def test_inference_path_matches_training_path(bidir, proj, lengths, B):
    """B = 3 takes the CPU's matrix-vector step, B = 7 the panel kernel that forms the input
    term inside the step (no projection before the loop; inference keeps one step's gates)."""
    m, w = _weights("lstm", 5, 11, 2, bidir, proj, dtype=torch.float32)
    x = torch.randn(9, B, 5)
    lens = None if lengths is None else torch.tensor(lengths + [9, 1, 5, 2][:B - 3])
    kw = dict(num_layers=2, bidirectional=bidir, lengths=lens)
    with torch.no_grad():
        out_i, (h_i, c_i) = seqkernels.lstm(x, w, **kw)  # no workspace kept
    out_t, (h_t, c_t) = seqkernels.lstm(x.requires_grad_(), w, **kw)
    for a, b in ((out_i, out_t), (h_i, h_t), (c_i, c_t)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_inference_op_keeps_no_workspace_and_refuses_backward():
    args = list(_layer_args(3, True))
    y, hn, cn, gates, hs, cs, rs = OPS.lstm_layer_forward(*args, True)
    yi, hni, cni, gates_i, _, cs_i, rs_i = OPS.lstm_layer_forward(*args, False)
    assert gates_i.numel() == cs_i.numel() == rs_i.numel() == 0
    torch.testing.assert_close(yi, y, rtol=0, atol=0)
    torch.testing.assert_close(cni, cn, rtol=0, atol=0)
    torch.library.opcheck(OPS.lstm_layer_forward, tuple(args) + (False,), test_utils=("test_schema", "test_faketensor"))
    args[0] = args[0].clone().requires_grad_()
    out = OPS.lstm_layer_forward(*args, False)[0]
    with pytest.raises(RuntimeError, match="workspace=False"):
        out.sum().backward()
