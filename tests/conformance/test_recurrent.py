"""The recurrent drop-ins against torch.nn on its edge cases: cell states (item 4),
torch.compile with batch_first (8), TorchScript (10), empty inputs (11), exception types
(12)."""

from __future__ import annotations

import pytest
import torch

import seqkernels

from .helpers import assert_raises_like_torch


def _pair(cls_name, *args, **kwargs):
    """(torch's module, the drop-in with the same parameters)."""
    theirs = getattr(torch.nn, cls_name)(*args, **kwargs)
    ours = getattr(seqkernels.nn, cls_name)(*args, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


BAD_CELL_STATES = {
    "transposed": lambda: torch.randn(20, 3),
    "4-D": lambda: torch.randn(3, 1, 1, 20),
    "flat B*H": lambda: torch.randn(60),
    "batch 1": lambda: torch.randn(1, 20),
    "hidden 21": lambda: torch.randn(3, 21),
}


@pytest.mark.parametrize("state", list(BAD_CELL_STATES))
@pytest.mark.parametrize("cell", ["LSTMCell", "RNNCell"])
def test_cells_refuse_wrong_states_like_torch(cell, state):
    theirs, ours = _pair(cell, 10, 20)
    x = torch.randn(3, 10)
    h = BAD_CELL_STATES[state]()
    hx = (h, torch.randn(3, 20)) if cell == "LSTMCell" else h
    assert_raises_like_torch(lambda: ours(x, hx), lambda: theirs(x, hx))
    if cell == "LSTMCell":  # the cell state too
        hx = (torch.randn(3, 20), h)
        assert_raises_like_torch(lambda: ours(x, hx), lambda: theirs(x, hx))


def test_cell_batch_mismatch_message_is_torchs():
    theirs, ours = _pair("LSTMCell", 10, 20)
    x, hx = torch.randn(3, 10), (torch.randn(1, 20), torch.randn(1, 20))
    with pytest.raises(RuntimeError, match="Input batch size 3 doesn't match hidden0 batch size 1"):
        ours(x, hx)


@pytest.mark.parametrize("cell", ["LSTMCell", "RNNCell"])
@pytest.mark.parametrize("shape", [(10,), (3, 10)])
def test_cells_accept_what_torch_accepts(cell, shape):
    theirs, ours = _pair(cell, 10, 20)
    x = torch.randn(shape)
    h = torch.randn(shape[:-1] + (20,))
    hx = (h, torch.randn_like(h)) if cell == "LSTMCell" else h
    torch.testing.assert_close(ours(x, hx), theirs(x, hx))


EMPTY = {
    "LSTMCell batch 0": ("LSTMCell", (10, 20), (0, 10)),
    "RNNCell batch 0": ("RNNCell", (10, 20), (0, 10)),
    "LSTMCell hidden 0": ("LSTMCell", (10, 0), (3, 10)),
    "RNNCell hidden 0": ("RNNCell", (10, 0), (3, 10)),
    "LSTM batch 0": ("LSTM", (10, 20), (5, 0, 10)),
    "RNN batch 0": ("RNN", (10, 20), (5, 0, 10)),
    "LSTM batch_first batch 0": ("LSTM", (10, 20, 2, True, True), (0, 5, 10)),
    "LSTM seq 0": ("LSTM", (10, 20), (0, 3, 10)),
    "RNN seq 0": ("RNN", (10, 20), (0, 3, 10)),
}


@pytest.mark.parametrize("name", list(EMPTY))
def test_empty_inputs_like_torch(name):
    cls, args, shape = EMPTY[name]
    theirs, ours = _pair(cls, *args)
    x = torch.randn(shape)
    try:
        expected = theirs(x)
    except Exception:  # noqa: BLE001
        assert_raises_like_torch(lambda: ours(x), lambda: theirs(x))
        return
    actual = ours(x)
    flat = lambda r: [t for t in (r if isinstance(r, tuple) else (r,)) for t in (t if isinstance(t, tuple) else (t,))]  # noqa: E731
    for a, e in zip(flat(actual), flat(expected)):
        assert a.shape == e.shape and a.dtype == e.dtype
        torch.testing.assert_close(a, e)


def test_hidden_size_zero_modules_raise_like_torch():
    assert_raises_like_torch(lambda: seqkernels.nn.LSTM(10, 0), lambda: torch.nn.LSTM(10, 0))


BAD_NETWORK_CALLS = {
    "input size": lambda m: m(torch.randn(5, 3, 11)),
    "dtype": lambda m: m(torch.randn(5, 3, 10, dtype=torch.float64)),
    "rank 4": lambda m: m(torch.randn(5, 3, 3, 10)),
    "h_0 shape": lambda m: m(torch.randn(5, 3, 10), (torch.randn(1, 3, 21), torch.randn(1, 3, 20))),
    "h_0 batch": lambda m: m(torch.randn(5, 3, 10), (torch.randn(1, 4, 20), torch.randn(1, 4, 20))),
    "unbatched with 3-D hx": lambda m: m(torch.randn(5, 10), (torch.randn(1, 3, 20), torch.randn(1, 3, 20))),
}


@pytest.mark.parametrize("name", list(BAD_NETWORK_CALLS))
def test_lstm_errors_are_torchs_types(name):
    theirs, ours = _pair("LSTM", 10, 20)
    assert_raises_like_torch(lambda: BAD_NETWORK_CALLS[name](ours), lambda: BAD_NETWORK_CALLS[name](theirs))


@pytest.mark.parametrize("hidden,layers", [(6, 2), (8, 1)])
@pytest.mark.parametrize("cls", ["LSTM", "RNN"])
def test_batch_first_trains_under_compile(cls, hidden, layers):
    theirs, ours = _pair(cls, 8, hidden, num_layers=layers, batch_first=True)
    x = torch.randn(3, 5, 8, requires_grad=True)
    f = torch.compile(lambda x: ours(x)[0].pow(2).sum(), fullgraph=True)
    f(x).backward()
    g_ours = [x.grad.clone()] + [p.grad.clone() for p in ours.parameters()]
    x.grad = None
    theirs(x)[0].pow(2).sum().backward()
    g_theirs = [x.grad] + [p.grad for p in theirs.parameters()]
    for a, e in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("cls", ["LSTM", "RNN", "LSTMCell", "RNNCell", "MultiheadAttention"])
def test_torchscript_raises_a_clear_error(cls):
    m = getattr(seqkernels.nn, cls)(4, 2)
    with pytest.raises(RuntimeError, match="torch.compile"):
        torch.jit.script(m)
    with pytest.raises(RuntimeError, match="torch.compile"):  # also inside a model
        torch.jit.script(torch.nn.Sequential(m))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_of_a_module_calling_the_functions_raises_a_clear_error():
    class Attn(torch.nn.Module):
        def forward(self, q):
            return seqkernels.flash_attention(q, q, q)

    with pytest.raises(RuntimeError, match="torch.compile"):
        torch.jit.script(Attn())
