"""bfloat16 LSTM and RNN on the CPU (csrc/rnn/rnn_cpu.cpp's bf16 loops).

The bf16 layer keeps x, h and the weights in bf16 and the gates, the cell state and every
sum in fp32, rounding h to bf16 after each step. Checked three ways: against a plain-PyTorch
emulation of exactly that math (tight: only the order of the fp32 sums differs), against
float64 with at most twice the error of torch's own bf16 ``nn.LSTM`` / ``nn.RNN`` (flash-attn's
accuracy rule, outputs and gradients), and through opcheck. Even sizes take the bf16
micro-kernel on AVX512-BF16 builds, odd ones (and the avx2/avx512 builds, which make test
runs under each capability) the fp32 products: both are covered here.
"""

from __future__ import annotations

import pytest
import torch

import seqkernels
from seqkernels import testing

OPS = torch.ops.seqkernels
BF16 = torch.bfloat16


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def emulated_lstm(x, h0, c0, w_ih, w_hh, bias, w_hr=None):
    """One forward LSTM layer, bf16 storage and fp32 math, h rounded to bf16 each step."""
    f = lambda t: t.float()  # noqa: E731
    h, c, ys = h0, f(c0), []
    for t in range(x.shape[0]):
        z = f(x[t]) @ f(w_ih).T + f(h) @ f(w_hh).T + (0 if bias is None else f(bias))
        i, fg, g, o = z.chunk(4, 1)
        c = torch.sigmoid(fg) * c + torch.sigmoid(i) * torch.tanh(g)
        r = torch.sigmoid(o) * torch.tanh(c)
        h = (r @ f(w_hr).T if w_hr is not None else r).to(BF16)
        ys.append(h)
    return torch.stack(ys), h, c.to(BF16)


def emulated_rnn(x, h0, w_ih, w_hh, bias, relu):
    f = lambda t: t.float()  # noqa: E731
    h, ys = h0, []
    for t in range(x.shape[0]):
        z = f(x[t]) @ f(w_ih).T + f(h) @ f(w_hh).T + (0 if bias is None else f(bias))
        h = (torch.relu(z) if relu else torch.tanh(z)).to(BF16)
        ys.append(h)
    return torch.stack(ys), h


def assert_matches_emulation(got, exp):
    """Equal but where an fp32 sum's order flips a rounding: at least 98% of the elements
    bit-equal (measured: 99% to 100%), the rest within a bf16 ulp or two."""
    assert got.dtype == exp.dtype == BF16
    torch.testing.assert_close(got.float(), exp.float(), rtol=2 ** -7, atol=2e-3)
    assert (got == exp).float().mean() >= 0.98


def layer_inputs(T, B, I, H, P=None, G=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = H if P is None else P
    s = H ** -0.5
    r = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(BF16)  # noqa: E731
    return dict(x=r(T, B, I), h0=r(B, P, scale=0.5), c0=r(B, H, scale=0.5), w_ih=r(G * H, I, scale=s),
                w_hh=r(G * H, P, scale=s), bias=r(G * H, scale=s), w_hr=r(P, H, scale=s) if P != H else None)


# (T, B, I, H): even sizes (the micro-kernel on AVX512-BF16), odd ones, batch 1, more rows
# than one block (6) and hidden sizes that are not multiples of the 16-unit panels
SHAPES = [(7, 5, 16, 32), (5, 1, 2, 2), (6, 13, 10, 22), (4, 3, 7, 9), (9, 8, 24, 5)]


@pytest.mark.parametrize("T,B,I,H", SHAPES)
@pytest.mark.parametrize("workspace", [True, False])
def test_lstm_layer_matches_the_bf16_emulation(T, B, I, H, workspace):
    a = layer_inputs(T, B, I, H)
    y, hn, cn, gates, hs, cs, rs = OPS.lstm_layer_forward(a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["bias"],
                                                          None, None, False, workspace)
    ey, eh, ec = emulated_lstm(a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["bias"])
    assert y.dtype == hn.dtype == cn.dtype == BF16
    if workspace:
        assert gates.dtype == cs.dtype == torch.float32 and gates.shape == (T, B, 4 * H)
    for got, exp in ((y, ey), (hn, eh), (cn, ec)):
        assert_matches_emulation(got, exp)


@pytest.mark.parametrize("T,B,I,H,P", [(6, 7, 8, 12, 4), (5, 3, 9, 6, 3)])
def test_lstmp_layer_matches_the_bf16_emulation(T, B, I, H, P):
    a = layer_inputs(T, B, I, H, P)
    y, hn, cn, *_ = OPS.lstm_layer_forward(a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["bias"], a["w_hr"],
                                           None, False, True)
    ey, eh, ec = emulated_lstm(a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["bias"], a["w_hr"])
    for got, exp in ((y, ey), (hn, eh), (cn, ec)):
        assert_matches_emulation(got, exp)


@pytest.mark.parametrize("T,B,I,H", SHAPES[:4])
@pytest.mark.parametrize("relu", [False, True])
def test_rnn_layer_matches_the_bf16_emulation(T, B, I, H, relu):
    a = layer_inputs(T, B, I, H, G=1)
    y, hn, _ = OPS.rnn_layer_forward(a["x"], a["h0"], a["w_ih"], a["w_hh"], a["bias"], None, False, relu)
    ey, eh = emulated_rnn(a["x"], a["h0"], a["w_ih"], a["w_hh"], a["bias"], relu)
    assert y.dtype == BF16
    for got, exp in ((y, ey), (hn, eh)):
        assert_matches_emulation(got, exp)


def _modules(kind, I, H, seed=0, **kw):
    torch.manual_seed(seed)
    m64 = getattr(torch.nn, kind)(I, H, **kw).double()
    tb = getattr(torch.nn, kind)(I, H, **kw).to(BF16)
    ob = getattr(seqkernels.nn, kind)(I, H, **kw).to(BF16)
    tb.load_state_dict(m64.state_dict())
    ob.load_state_dict(m64.state_dict())
    return m64, tb, ob


def _run(m, x, lengths):
    if lengths is None:
        out, hx = m(x)
    else:
        p = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, hx = m(p)
        out = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=x.shape[0])[0]
    return [out, *(hx if isinstance(hx, tuple) else (hx,))]


CASES = [
    ("LSTM", 12, 16, 32, dict()),
    ("LSTM", 9, 7, 11, dict(bidirectional=True, num_layers=2)),
    ("LSTM", 8, 10, 12, dict(proj_size=6)),
    ("RNN", 12, 16, 32, dict()),
    ("RNN", 9, 7, 11, dict(nonlinearity="relu", bidirectional=True)),
]


@pytest.mark.parametrize("kind,T,I,H,kw", CASES)
@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")  # torch's own bf16 LSTMP
def test_error_at_most_twice_torchs_bf16_outputs_and_gradients(kind, T, I, H, kw, with_lengths):
    """flash-attn's rule: our error against float64 at most 2x torch's own bf16 error (plus a
    floor of a quarter bf16 ulp for values torch happens to round exactly)."""
    B = 6
    m64, tb, ob = _modules(kind, I, H, **kw)
    x64 = torch.randn(T, B, I, dtype=torch.float64)
    lengths = torch.tensor([T, 3, 1, T - 2, 5, T]) if with_lengths else None
    results = {}
    for name, m, dt in (("f64", m64, torch.float64), ("torch", tb, BF16), ("ours", ob, BF16)):
        x = x64.to(dt).requires_grad_()
        outs = _run(m, x, lengths)
        g = torch.Generator().manual_seed(1)
        loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum() for o in outs)
        grads = torch.autograd.grad(loss, [x, *m.parameters()])
        results[name] = outs + list(grads)
    for k, (e, t, o) in enumerate(zip(results["f64"], results["torch"], results["ours"])):
        assert o.dtype == BF16, k
        assert not torch.isnan(o).any(), k
        assert rel_err(o, e) <= 2 * rel_err(t, e) + 2 ** -10, (k, rel_err(o, e), rel_err(t, e))


@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_opcheck_bf16(kind):
    a = layer_inputs(4, 3, 8, 6, G=4 if kind == "lstm" else 1)
    for t in a.values():
        if t is not None:
            t.requires_grad_()
    if kind == "lstm":
        args = (a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["bias"], None, None, False, True)
        torch.library.opcheck(OPS.lstm_layer_forward, args)
    else:
        args = (a["x"], a["h0"], a["w_ih"], a["w_hh"], a["bias"], None, True, False)
        torch.library.opcheck(OPS.rnn_layer_forward, args)


def test_nan_in_one_sequence_stays_in_that_sequence():
    a = layer_inputs(5, 4, 8, 16)
    x = a["x"].clone()
    x[2, 1, 3] = float("nan")
    y, hn, cn, *_ = OPS.lstm_layer_forward(x, a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["bias"], None, None, False,
                                           False)
    assert not torch.isnan(y[:2]).any() and not torch.isnan(y[:, [0, 2, 3]]).any()
    assert torch.isnan(y[2:, 1]).all() and torch.isnan(cn[1]).all()
    y, hn, _ = OPS.rnn_layer_forward(x, a["h0"], a["w_ih"][:16], a["w_hh"][:16, :16].contiguous(), None, None, False,
                                     False)
    assert torch.isnan(y[2:, 1]).all() and not torch.isnan(y[:, [0, 2, 3]]).any()


def test_backward_op_rejects_bf16_gates():
    a = layer_inputs(3, 2, 4, 4)
    y, hn, cn, gates, hs, cs, rs = OPS.lstm_layer_forward(a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["bias"],
                                                          None, None, False, True)
    with pytest.raises(RuntimeError, match="float32"):
        OPS.lstm_layer_backward(y, hn, cn.float(), a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], None, None, False,
                                gates.to(BF16), y, hs, cs, rs, True)


def test_float16_on_the_cpu_is_a_clear_error():
    a = layer_inputs(3, 2, 4, 4)
    w = [(a["w_ih"].half(), a["w_hh"].half(), None, None, None)]
    with pytest.raises(TypeError, match="float32, float64 or bfloat16"):
        seqkernels.lstm(a["x"].half(), w)


def test_lstm_cell_bf16_matches_one_emulated_step():
    a = layer_inputs(1, 5, 8, 6)
    h, c = seqkernels.lstm_cell(a["x"][0], (a["h0"], a["c0"]), a["w_ih"], a["w_hh"], a["bias"],
                                torch.zeros_like(a["bias"]))
    ey, eh, ec = emulated_lstm(a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["bias"])
    testing.assert_close(h, eh.float(), BF16)
    testing.assert_close(c, ec.float(), BF16)


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_nan_and_empty_batch_as_torchs_bf16_module(kind):
    """Edge cases against torch's own bf16 module: NaN reaches the same outputs, an empty
    batch gives the same shapes and dtypes."""
    m64, tb, ob = _modules(kind, 8, 16)
    x = torch.randn(5, 4, 8, dtype=BF16)
    x[2, 1, 3] = float("nan")
    for a, b in zip(_run(ob, x, None), _run(tb, x, None)):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
    empty = torch.randn(5, 0, 8, dtype=BF16)
    for a, b in zip(_run(ob, empty, None), _run(tb, empty, None)):
        assert a.shape == b.shape and a.dtype == b.dtype == BF16
