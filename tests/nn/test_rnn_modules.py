"""seqkernels.nn recurrent modules as drop-ins: load torch's state_dict, match outputs and gradients."""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import seqkernels
from seqkernels import testing
from tests.helpers import grads_of

D64 = torch.float64


def pair(kind, *args, dtype=D64, **kwargs):
    t = getattr(torch.nn, kind)(*args, dtype=dtype, **kwargs)
    s = getattr(seqkernels.nn, kind)(*args, dtype=dtype, **kwargs)
    assert list(s.state_dict()) == list(t.state_dict())
    s.load_state_dict(t.state_dict())
    return t, s


def check(t, s, *inputs, tol_dtype=None):
    exp, got = t(*inputs), s(*inputs)
    flat_e, flat_g = _flatten(exp), _flatten(got)
    assert len(flat_e) == len(flat_g)
    for a, e in zip(flat_g, flat_e):
        testing.assert_close(a, e, tol_dtype)
    wrt_e = [i for i in inputs if isinstance(i, torch.Tensor) and i.requires_grad] + list(t.parameters())
    wrt_g = [i for i in inputs if isinstance(i, torch.Tensor) and i.requires_grad] + list(s.parameters())
    for a, e in zip(grads_of(flat_g, wrt_g), grads_of(flat_e, wrt_e)):
        testing.assert_close(a, e, tol_dtype, 10)


def _flatten(x):
    if isinstance(x, torch.nn.utils.rnn.PackedSequence):
        return [x.data]
    if isinstance(x, (tuple, list)):
        return [t for i in x for t in _flatten(i)]
    return [x]


LSTM_CFGS = [
    dict(),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=3, batch_first=True, bias=False),
    dict(num_layers=2, bidirectional=True, proj_size=4, batch_first=True),
    dict(num_layers=2, dropout=0.3),  # dropout only acts in training mode
]


@pytest.mark.parametrize("cfg", LSTM_CFGS)
@pytest.mark.parametrize("with_hx", [False, True])
def test_lstm(cfg, with_hx):
    t, s = pair("LSTM", 5, 7, **cfg)
    t.eval(), s.eval()
    x = torch.randn((3, 6, 5) if cfg.get("batch_first") else (6, 3, 5), dtype=D64, requires_grad=True)
    Dn = 2 if cfg.get("bidirectional") else 1
    L = cfg.get("num_layers", 1)
    args = [x]
    if with_hx:
        args.append((torch.randn(L * Dn, 3, cfg.get("proj_size") or 7, dtype=D64, requires_grad=True),
                     torch.randn(L * Dn, 3, 7, dtype=D64, requires_grad=True)))
    check(t, s, *args)


def test_lstm_unbatched():
    t, s = pair("LSTM", 5, 7, num_layers=2, bidirectional=True)
    x = torch.randn(6, 5, dtype=D64, requires_grad=True)
    check(t, s, x)
    check(t, s, x, (torch.randn(4, 7, dtype=D64), torch.randn(4, 7, dtype=D64)))


@pytest.mark.parametrize("kind,cfg", [("LSTM", dict(num_layers=2, bidirectional=True)),
                                      ("LSTM", dict(proj_size=3, batch_first=True)),
                                      ("RNN", dict(num_layers=2, bidirectional=True, nonlinearity="relu"))])
@pytest.mark.parametrize("enforce_sorted", [False, True])
def test_packed_sequence(kind, cfg, enforce_sorted):
    t, s = pair(kind, 4, 6, **cfg)
    lengths = torch.tensor([7, 5, 5, 2, 1]) if enforce_sorted else torch.tensor([5, 7, 1, 5, 2])
    bf = cfg.get("batch_first", False)
    x = torch.randn((5, 7, 4) if bf else (7, 5, 4), dtype=D64, requires_grad=True)
    packed = pack_padded_sequence(x, lengths, batch_first=bf, enforce_sorted=enforce_sorted)
    out_e, out_g = t(packed), s(packed)
    assert torch.equal(out_g[0].batch_sizes, out_e[0].batch_sizes)
    for name in ("sorted_indices", "unsorted_indices"):
        a, b = getattr(out_g[0], name), getattr(out_e[0], name)
        assert (a is None and b is None) or torch.equal(a, b)
    check(t, s, packed)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_rnn(nonlinearity):
    t, s = pair("RNN", 5, 7, 2, nonlinearity, bidirectional=True)  # positional nonlinearity, as torch allows
    assert s.nonlinearity == nonlinearity and s.mode == t.mode
    x = torch.randn(6, 3, 5, dtype=D64, requires_grad=True)
    check(t, s, x, torch.randn(4, 3, 7, dtype=D64, requires_grad=True))


def test_cells():
    t, s = pair("LSTMCell", 5, 7)
    x = torch.randn(3, 5, dtype=D64, requires_grad=True)
    check(t, s, x)
    check(t, s, x, (torch.randn(3, 7, dtype=D64), torch.randn(3, 7, dtype=D64)))
    check(t, s, x[0])  # unbatched
    for nl in ("tanh", "relu"):
        t, s = pair("RNNCell", 5, 7, nonlinearity=nl)
        check(t, s, x, torch.randn(3, 7, dtype=D64))
        check(t, s, x[0])


def test_dropout_between_layers_in_training():
    _, s = pair("LSTM", 5, 7, num_layers=2, dropout=0.5, dtype=torch.float32)
    x = torch.randn(6, 3, 5)
    s.eval()
    ref = s(x)[0]
    s.train()
    assert not torch.allclose(s(x)[0], ref)  # dropout acted
    s.eval()
    torch.testing.assert_close(s(x)[0], ref)


def test_float32_and_unsupported_dtype_fallback():
    t, s = pair("LSTM", 5, 7, num_layers=2, dtype=torch.float32)
    check(t, s, torch.randn(6, 3, 5, requires_grad=True), tol_dtype=torch.float32)
    tb, sb = pair("LSTM", 5, 7, dtype=torch.float16)
    x = torch.randn(6, 3, 5, dtype=torch.float16)
    torch.testing.assert_close(sb(x)[0], tb(x)[0])  # runs torch's own float16 CPU path


def test_convert_in_place_keeps_parameters_and_results():
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.LSTM(5, 6, num_layers=2))
    x = torch.randn(7, 2, 4)
    before = model(x[:, :, :])
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert seqkernels.nn.convert(model) is model
    assert type(model[1]) is seqkernels.nn.LSTM and type(model[0]) is torch.nn.Linear
    assert all(a is b for a, b in zip(model.parameters(), params))
    torch.testing.assert_close(model(x)[0], before[0], rtol=1e-5, atol=1e-5)
    model(x)[0].sum().backward()
    opt.step()  # the optimizer built before the conversion still drives the parameters


def test_convert_leaves_subclasses_alone():
    class MyLSTM(torch.nn.LSTM):
        pass

    m = torch.nn.ModuleList([MyLSTM(2, 3), torch.nn.RNN(2, 3), torch.nn.RNNCell(2, 3), torch.nn.LSTMCell(2, 3)])
    seqkernels.nn.convert(m)
    assert [type(x) for x in m] == [MyLSTM, seqkernels.nn.RNN, seqkernels.nn.RNNCell, seqkernels.nn.LSTMCell]


def test_constructor_errors_match_torch():
    with pytest.raises(ValueError, match="nonlinearity"):
        seqkernels.nn.RNN(3, 4, nonlinearity="gelu")
    with pytest.raises(ValueError, match="proj_size"):
        seqkernels.nn.RNN(3, 4, proj_size=2)
