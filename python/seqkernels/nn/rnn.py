"""Drop-in recurrent modules: ``torch.nn.LSTM``, ``LSTMCell``, ``RNN`` and ``RNNCell`` on the
fused kernels.

Constructor arguments, parameter names, ``state_dict`` keys and ``repr`` are torch's. The
cells subclass ``torch.nn.LSTMCell`` / ``RNNCell``; ``LSTM`` and ``RNN`` subclass
``torch.nn.RNNBase`` (which holds all of torch's parameter logic) rather than
``torch.nn.LSTM`` / ``RNN`` themselves, because ``torch.compile`` refuses to trace any
instance of those two classes (torch._dynamo.config.allow_rnn), whatever its forward; so
``isinstance(m, torch.nn.LSTM)`` is False for them. A ``PackedSequence`` input runs on the padded kernels with per-sequence lengths
(no packed path) and comes back as a ``PackedSequence`` with the input's ordering.

Inputs whose dtype the kernels do not take on their device (float16 on the CPU) run torch's
own implementation, so a converted model keeps working everywhere.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ..errors import ArgumentError
from ..ops import rnn as _ops
from ._script import NotScriptable


def _weight_tuples(module: torch.nn.RNNBase, lstm: bool) -> list[tuple]:
    D = 2 if module.bidirectional else 1
    out = []
    for layer in range(module.num_layers):
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d == 1 else "")
            w = [getattr(module, "weight_ih" + sfx), getattr(module, "weight_hh" + sfx),
                 getattr(module, "bias_ih" + sfx, None), getattr(module, "bias_hh" + sfx, None)]
            if lstm:
                w.append(getattr(module, "weight_hr" + sfx, None))
            out.append(tuple(w))
    return out


def _kernel_takes(x: Tensor) -> bool:
    return x.device.type == "cuda" or x.dtype in (torch.float32, torch.float64, torch.bfloat16)


def _unpack(input):
    """(padded (T, B, *) in the caller's batch order or the input itself, lengths or None)."""
    if not isinstance(input, PackedSequence):
        return input, None
    padded, lengths = pad_packed_sequence(input, batch_first=False)
    return padded, lengths


def _repack(output: Tensor, lengths: Tensor, like: PackedSequence) -> PackedSequence:
    """Pack (T, B, *) output with the same batch order (sorted_indices) as ``like``."""
    order = like.sorted_indices
    sorted_out = output if order is None else output.index_select(1, order)
    sorted_len = lengths if order is None else lengths.index_select(0, order.cpu())
    p = pack_padded_sequence(sorted_out, sorted_len, enforce_sorted=True)
    return PackedSequence(p.data, p.batch_sizes, like.sorted_indices, like.unsorted_indices)


class LSTM(NotScriptable, torch.nn.RNNBase):
    """``torch.nn.LSTM`` on the fused seqkernels kernels (same arguments, parameters and results)."""

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)

    # torch.nn.LSTM's own argument checks, used by its forward (the fallback path below)
    get_expected_cell_size = torch.nn.LSTM.get_expected_cell_size
    check_forward_args = torch.nn.LSTM.check_forward_args
    permute_hidden = torch.nn.LSTM.permute_hidden

    def forward(self, input, hx: Optional[tuple[Tensor, Tensor]] = None):  # noqa: D102
        x, lengths = _unpack(input)
        if not _kernel_takes(x):
            return torch.nn.LSTM.forward(self, input, hx)
        output, (h_n, c_n) = _ops.lstm(
            x, _weight_tuples(self, True), hx, num_layers=self.num_layers, bidirectional=self.bidirectional,
            batch_first=self.batch_first and lengths is None, dropout=self.dropout, training=self.training,
            lengths=lengths)
        if lengths is not None:
            output = _repack(output, lengths, input)
        return output, (h_n, c_n)


class RNN(NotScriptable, torch.nn.RNNBase):
    """``torch.nn.RNN`` (tanh or relu) on the fused seqkernels kernels."""

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ArgumentError("proj_size argument is only supported for LSTM, not RNN or GRU")
        # torch.nn.RNN's signature: (input_size, hidden_size, num_layers, nonlinearity, ...)
        if len(args) > 3:
            nonlinearity, args = args[3], args[:3] + args[4:]
        else:
            nonlinearity = kwargs.pop("nonlinearity", "tanh")
        modes = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}
        if nonlinearity not in modes:
            raise ArgumentError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(modes[nonlinearity], *args, **kwargs)
        self.nonlinearity = nonlinearity

    def forward(self, input, hx: Optional[Tensor] = None):  # noqa: D102
        x, lengths = _unpack(input)
        if not _kernel_takes(x):
            return torch.nn.RNN.forward(self, input, hx)
        output, h_n = _ops.rnn(
            x, _weight_tuples(self, False), hx, num_layers=self.num_layers, nonlinearity=self.nonlinearity,
            bidirectional=self.bidirectional, batch_first=self.batch_first and lengths is None,
            dropout=self.dropout, training=self.training, lengths=lengths)
        if lengths is not None:
            output = _repack(output, lengths, input)
        return output, h_n


class LSTMCell(NotScriptable, torch.nn.LSTMCell):
    """``torch.nn.LSTMCell`` on the fused seqkernels kernels."""

    def forward(self, input: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None):  # noqa: D102
        if not _kernel_takes(input):
            return super().forward(input, hx)
        return _ops.lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)


class RNNCell(NotScriptable, torch.nn.RNNCell):
    """``torch.nn.RNNCell`` (tanh or relu) on the fused seqkernels kernels."""

    def forward(self, input: Tensor, hx: Optional[Tensor] = None):  # noqa: D102
        if not _kernel_takes(input):
            return super().forward(input, hx)
        return _ops.rnn_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                             nonlinearity=self.nonlinearity)


_SWAPS = {torch.nn.LSTM: LSTM, torch.nn.RNN: RNN, torch.nn.LSTMCell: LSTMCell, torch.nn.RNNCell: RNNCell}
