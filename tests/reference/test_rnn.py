"""The recurrent references against torch.nn in float64: outputs and gradients to 1e-10."""

import pytest
import torch

from seqkernels import reference as ref
from tests.helpers import assert_all_close, grads_of

D = torch.float64


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_rnn_cell_matches_torch(nonlinearity):
    cell = torch.nn.RNNCell(7, 5, nonlinearity=nonlinearity, dtype=D)
    x = torch.randn(3, 7, dtype=D, requires_grad=True)
    h = torch.randn(3, 5, dtype=D, requires_grad=True)
    params = [cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh]
    exp = cell(x, h)
    act = ref.rnn_cell(x, h, *params, nonlinearity=nonlinearity)
    assert_all_close([act], [exp])
    assert_all_close(grads_of([act], [x, h, *params]), grads_of([exp], [x, h, *params]))


def test_rnn_cell_rejects_unknown_nonlinearity():
    with pytest.raises(ValueError, match="nonlinearity"):
        ref.rnn_cell(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(2, 2), torch.zeros(2, 2), nonlinearity="gelu")


@pytest.mark.parametrize("bias", [True, False])
def test_lstm_cell_matches_torch(bias):
    cell = torch.nn.LSTMCell(11, 6, bias=bias, dtype=D)
    x = torch.randn(4, 11, dtype=D, requires_grad=True)
    h = torch.randn(4, 6, dtype=D, requires_grad=True)
    c = torch.randn(4, 6, dtype=D, requires_grad=True)
    params = [cell.weight_ih, cell.weight_hh] + ([cell.bias_ih, cell.bias_hh] if bias else [None, None])
    exp = cell(x, (h, c))
    act = ref.lstm_cell(x, (h, c), *params)
    assert_all_close(act, exp)
    wrt = [x, h, c] + [p for p in params if p is not None]
    assert_all_close(grads_of(act, wrt), grads_of(exp, wrt))


RNN_CASES = [
    # (num_layers, bidirectional, batch_first, bias, with_hx, unbatched)
    (1, False, False, True, False, False),
    (2, True, False, True, True, False),
    (3, False, True, False, True, False),
    (2, True, True, True, False, True),
]


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("layers,bidir,batch_first,bias,with_hx,unbatched", RNN_CASES)
def test_rnn_sequence_matches_torch(nonlinearity, layers, bidir, batch_first, bias, with_hx, unbatched):
    T, B, I, H = 5, 3, 4, 6
    m = torch.nn.RNN(I, H, num_layers=layers, nonlinearity=nonlinearity, bias=bias,
                     batch_first=batch_first, bidirectional=bidir, dtype=D)
    Dn = 2 if bidir else 1
    shape = (T, I) if unbatched else ((B, T, I) if batch_first else (T, B, I))
    x = torch.randn(shape, dtype=D, requires_grad=True)
    hx = None
    if with_hx:
        hx = torch.randn((layers * Dn, H) if unbatched else (layers * Dn, B, H), dtype=D, requires_grad=True)
    out_e, h_e = m(x, hx)
    out_a, h_a = ref.rnn(x, ref.weights_from_module(m), hx, num_layers=layers, nonlinearity=nonlinearity,
                         bidirectional=bidir, batch_first=batch_first)
    assert_all_close([out_a, h_a], [out_e, h_e])
    wrt = [x, hx, *m.parameters()]
    assert_all_close(grads_of([out_a, h_a], wrt), grads_of([out_e, h_e], wrt))


LSTM_CASES = [
    # (num_layers, bidirectional, batch_first, bias, proj_size, with_hx, unbatched)
    (1, False, False, True, 0, False, False),
    (2, True, False, True, 0, True, False),
    (2, False, True, False, 3, True, False),
    (2, True, False, True, 4, True, False),
    (1, True, True, True, 2, False, True),
]


@pytest.mark.parametrize("layers,bidir,batch_first,bias,proj,with_hx,unbatched", LSTM_CASES)
def test_lstm_sequence_matches_torch(layers, bidir, batch_first, bias, proj, with_hx, unbatched):
    T, B, I, H = 6, 2, 5, 7
    m = torch.nn.LSTM(I, H, num_layers=layers, bias=bias, batch_first=batch_first,
                      bidirectional=bidir, proj_size=proj, dtype=D)
    Dn = 2 if bidir else 1
    P = proj or H
    shape = (T, I) if unbatched else ((B, T, I) if batch_first else (T, B, I))
    x = torch.randn(shape, dtype=D, requires_grad=True)
    hx = None
    if with_hx:
        bshape = () if unbatched else (B,)
        hx = (torch.randn(layers * Dn, *bshape, P, dtype=D, requires_grad=True),
              torch.randn(layers * Dn, *bshape, H, dtype=D, requires_grad=True))
    out_e, (h_e, c_e) = m(x, hx)
    out_a, (h_a, c_a) = ref.lstm(x, ref.weights_from_module(m), hx, num_layers=layers,
                                 bidirectional=bidir, batch_first=batch_first)
    assert_all_close([out_a, h_a, c_a], [out_e, h_e, c_e])
    wrt = [x, *(hx or ()), *m.parameters()]
    assert_all_close(grads_of([out_a, h_a, c_a], wrt), grads_of([out_e, h_e, c_e], wrt))


@pytest.mark.parametrize("bidir", [False, True])
def test_lstm_lengths_match_packed_sequence(bidir):
    """Steps past a sequence's length leave its state untouched and give zero output,
    exactly what torch's PackedSequence path computes."""
    T, B, I, H = 7, 4, 3, 5
    m = torch.nn.LSTM(I, H, num_layers=2, bidirectional=bidir, dtype=D)
    x = torch.randn(T, B, I, dtype=D, requires_grad=True)
    lengths = torch.tensor([7, 3, 1, 5])
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    out_p, (h_e, c_e) = m(packed)
    out_e, _ = torch.nn.utils.rnn.pad_packed_sequence(out_p, total_length=T)
    out_a, (h_a, c_a) = ref.lstm(x, ref.weights_from_module(m), num_layers=2, bidirectional=bidir,
                                 lengths=lengths)
    assert_all_close([out_a, h_a, c_a], [out_e, h_e, c_e])
    wrt = [x, *m.parameters()]
    assert_all_close(grads_of([out_a, h_a, c_a], wrt), grads_of([out_e, h_e, c_e], wrt))


def test_rnn_rejects_wrong_rank_and_weight_count():
    m = torch.nn.RNN(3, 4, dtype=D)
    with pytest.raises(ValueError, match="input"):
        ref.rnn(torch.zeros(1, 2, 3, 4, dtype=D), ref.weights_from_module(m))
    with pytest.raises(ValueError, match="weight tuples"):
        ref.rnn(torch.zeros(2, 1, 3, dtype=D), ref.weights_from_module(m), num_layers=2)
