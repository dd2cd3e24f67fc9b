"""Randomized shapes and options (hypothesis) for the CPU kernels against the float64 reference.

The hand-written grids in test_attention.py / test_rnn.py pick the edges on purpose; these
draw combinations nobody listed (lengths around the tile sizes, GQA ratios, odd head dims,
causal alignments, lengths per sequence, projections). Few examples each, so they stay quick.
"""

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import seqkernels
from seqkernels import reference as ref
from seqkernels import testing
from tests.helpers import grads_of

D64 = torch.float64
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def attention_problem(draw):
    hk = draw(st.integers(1, 3))
    h = hk * draw(st.integers(1, 3))
    lens = st.one_of(st.integers(1, 20), st.sampled_from([63, 64, 65, 127, 128, 129, 255, 257, 383, 385]))
    return dict(B=draw(st.integers(1, 2)), H=h, Hk=hk, Lq=draw(lens), Lk=draw(lens), D=draw(st.integers(1, 70)),
                Dv=draw(st.integers(1, 70)), causal=draw(st.booleans()), bottom_right=draw(st.booleans()),
                scale=draw(st.one_of(st.none(), st.floats(0.01, 2.0))))


@SETTINGS
@given(attention_problem())
def test_attention_random_problems(p):
    g = torch.Generator().manual_seed(p["Lq"] * 7919 + p["Lk"])
    q = torch.randn(p["B"], p["H"], p["Lq"], p["D"], generator=g, dtype=D64, requires_grad=True)
    k = torch.randn(p["B"], p["Hk"], p["Lk"], p["D"], generator=g, dtype=D64, requires_grad=True)
    v = torch.randn(p["B"], p["Hk"], p["Lk"], p["Dv"], generator=g, dtype=D64, requires_grad=True)
    scale = 1 / math.sqrt(p["D"]) if p["scale"] is None else p["scale"]
    out, lse = torch.ops.seqkernels.flash_attention_forward(q, k, v, p["causal"], p["bottom_right"], scale)
    exp, lse_e = ref.flash_attention(q, k, v, causal=p["causal"], scale=scale, bottom_right=p["bottom_right"])
    testing.assert_close(out, exp, msg=str(p))
    fin = torch.isfinite(lse_e)
    assert torch.equal(torch.isfinite(lse), fin)
    testing.assert_close(lse[fin], lse_e[fin], msg=str(p))
    for a, e in zip(grads_of([out], [q, k, v]), grads_of([exp], [q, k, v])):
        testing.assert_close(a, e, D64, 10, msg=str(p))


@st.composite
def lstm_problem(draw):
    T, B = draw(st.integers(1, 9)), draw(st.integers(1, 5))
    H = draw(st.integers(1, 40))
    lengths = draw(st.one_of(st.none(), st.lists(st.integers(1, T), min_size=B, max_size=B)))
    return dict(T=T, B=B, I=draw(st.integers(1, 24)), H=H, layers=draw(st.integers(1, 2)),
                bidir=draw(st.booleans()), bias=draw(st.booleans()),
                proj=draw(st.one_of(st.just(0), st.integers(1, H - 1))) if H > 1 else 0, lengths=lengths)


@SETTINGS
@given(lstm_problem())
def test_lstm_random_problems(p):
    torch.manual_seed(p["T"] * 31 + p["H"])
    m = torch.nn.LSTM(p["I"], p["H"], num_layers=p["layers"], bidirectional=p["bidir"], bias=p["bias"],
                      proj_size=p["proj"], dtype=D64)
    w = ref.weights_from_module(m)
    x = torch.randn(p["T"], p["B"], p["I"], dtype=D64, requires_grad=True)
    lengths = None if p["lengths"] is None else torch.tensor(p["lengths"])
    kw = dict(num_layers=p["layers"], bidirectional=p["bidir"], lengths=lengths)
    out, (h, c) = seqkernels.lstm(x, w, **kw)
    exp, (he, ce) = ref.lstm(x, w, **kw)
    for a, e in zip((out, h, c), (exp, he, ce)):
        testing.assert_close(a, e, msg=str(p))
    wrt = [x, *m.parameters()]
    for a, e in zip(grads_of([out, h, c], wrt), grads_of([exp, he, ce], wrt)):
        testing.assert_close(a, e, D64, 10, msg=str(p))
