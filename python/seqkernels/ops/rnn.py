"""The recurrent ops: ``seqkernels::lstm_layer_*`` and ``seqkernels::rnn_layer_*``.

Schemas are declared in ``csrc/seqkernels.cpp``; the time loop is ``csrc/rnn/rnn_layer.h``,
with its CPU body in ``csrc/rnn/rnn_cpu.cpp`` and CUDA body in ``csrc/rnn/rnn_cuda.cu``.
This module adds the fake kernels and autograd, and builds the public functions: whole
networks (layers x directions, dropout between layers) on top of the one-direction layer
op, and the cells as one-step layers. There is no Python work per time step.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _C  # noqa: F401  (registers the schemas and the CPU/CUDA kernels)
from ..errors import ArgumentError, ArgumentTypeError
from ._common import forbid_double_backward, functorch_wrapped, script_unsupported

_ops = torch.ops.seqkernels


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _like(t: Tensor) -> Tensor:
    """A contiguous tensor of t's shape, dtype and device (what the kernels return)."""
    return t.new_empty(t.shape)


# --- fake kernels --------------------------------------------------------------------------

def _workspace_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the LSTM's saved gates, cs and rs: float32 for a bf16 layer on the CPU
    (its gates and cell state are fp32), else the input's."""
    return torch.float32 if x.device.type == "cpu" and x.dtype == torch.bfloat16 else x.dtype


@torch.library.register_fake("seqkernels::lstm_layer_forward")
def _lstm_fwd_fake(x, h0, c0, w_ih, w_hh, bias, w_hr, lengths, reverse, workspace=True):
    T, B, _ = x.shape
    H, P = w_hh.shape[0] // 4, w_hh.shape[1]
    y = x.new_empty(T, B, P)
    hs = x.new_empty(T, B, P) if lengths is not None else _empty(x)
    ws = x.new_empty(0, dtype=_workspace_dtype(x))
    if not workspace:
        return y, x.new_empty(B, P), x.new_empty(B, H), ws, hs, ws.new_empty(0), ws.new_empty(0)
    rs = ws.new_empty(T, B, H) if w_hr is not None else ws.new_empty(0)
    return y, x.new_empty(B, P), x.new_empty(B, H), ws.new_empty(T, B, 4 * H), hs, ws.new_empty(T, B, H), rs


@torch.library.register_fake("seqkernels::lstm_layer_backward")
def _lstm_bwd_fake(gy, ghn, gcn, x, h0, c0, w_ih, w_hh, w_hr, lengths, reverse, gates, y, hs, cs, rs, has_bias):
    # the kernels return contiguous gradients whatever the inputs' strides (empty_like would
    # keep a batch_first input's transposed strides, which breaks compiled backward graphs)
    return (_like(x), _like(h0), _like(c0), _like(w_ih), _like(w_hh),
            x.new_empty(w_ih.shape[0]) if has_bias else _empty(x), _like(w_hr) if w_hr is not None else _empty(x))


@torch.library.register_fake("seqkernels::rnn_layer_forward")
def _rnn_fwd_fake(x, h0, w_ih, w_hh, bias, lengths, reverse, relu):
    T, B, _ = x.shape
    H = w_hh.shape[0]
    return x.new_empty(T, B, H), x.new_empty(B, H), (x.new_empty(T, B, H) if lengths is not None else _empty(x))


@torch.library.register_fake("seqkernels::rnn_layer_backward")
def _rnn_bwd_fake(gy, ghn, x, h0, w_ih, w_hh, lengths, reverse, relu, y, hs, has_bias):
    return _like(x), _like(h0), _like(w_ih), _like(w_hh), x.new_empty(w_ih.shape[0]) if has_bias else _empty(x)


# --- autograd ------------------------------------------------------------------------------

def _zeros_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


def _lstm_setup(ctx, inputs, output):
    x, h0, c0, w_ih, w_hh, bias, w_hr, lengths, reverse = inputs[:9]
    ctx.workspace = inputs[9] if len(inputs) > 9 else True
    y, hn, cn, gates, hs, cs, rs = output
    ctx.mark_non_differentiable(gates, hs, cs, rs)
    # Unused outputs get None, not a zero-filled tensor: the workspace outputs are large
    # (gates alone is T*B*4H) and autograd would fill them with zeros on every backward.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, w_hr, lengths, gates, y, hs, cs, rs)
    ctx.reverse, ctx.has_bias = reverse, bias is not None


def _lstm_backward(ctx, gy, ghn, gcn, *_workspace_grads):
    if not ctx.workspace:
        raise RuntimeError("seqkernels::lstm_layer_forward ran with workspace=False (inference): it kept "
                           "nothing for a backward; call it with workspace=True to differentiate")
    x, h0, c0, w_ih, w_hh, w_hr, lengths, gates, y, hs, cs, rs = ctx.saved_tensors
    dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = _ops.lstm_layer_backward(
        _zeros_if_none(gy, y), _zeros_if_none(ghn, h0), _zeros_if_none(gcn, c0), x, h0, c0, w_ih, w_hh,
        w_hr, lengths, ctx.reverse, gates, y, hs, cs, rs, ctx.has_bias)
    return (dx, dh0, dc0, dw_ih, dw_hh, db if ctx.has_bias else None, dw_hr if w_hr is not None else None,
            None, None, None)


def _rnn_setup(ctx, inputs, output):
    x, h0, w_ih, w_hh, bias, lengths, reverse, relu = inputs
    y, hn, hs = output
    ctx.mark_non_differentiable(hs)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, h0, w_ih, w_hh, lengths, y, hs)
    ctx.reverse, ctx.relu, ctx.has_bias = reverse, relu, bias is not None


def _rnn_backward(ctx, gy, ghn, _ghs):
    x, h0, w_ih, w_hh, lengths, y, hs = ctx.saved_tensors
    dx, dh0, dw_ih, dw_hh, db = _ops.rnn_layer_backward(
        _zeros_if_none(gy, y), _zeros_if_none(ghn, h0), x, h0, w_ih, w_hh, lengths, ctx.reverse, ctx.relu,
        y, hs, ctx.has_bias)
    return dx, dh0, dw_ih, dw_hh, (db if ctx.has_bias else None), None, None, None


torch.library.register_autograd("seqkernels::lstm_layer_forward", _lstm_backward, setup_context=_lstm_setup)
torch.library.register_autograd("seqkernels::rnn_layer_forward", _rnn_backward, setup_context=_rnn_setup)
forbid_double_backward("seqkernels::lstm_layer_backward")
forbid_double_backward("seqkernels::rnn_layer_backward")


# --- argument checks -------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, t, like: Tensor, shape: Optional[tuple] = None, fn: str = "lstm") -> None:
    if not isinstance(t, Tensor):
        raise ArgumentTypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != like.dtype:
        raise ArgumentTypeError(f"{fn}: {name} must have the input's dtype {like.dtype}, got {t.dtype}")
    if t.device != like.device:
        raise ArgumentError(f"{fn}: {name} must be on the input's device {like.device}, got {t.device}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ArgumentError(f"{fn}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_input(x: Tensor, fn: str) -> None:
    if not isinstance(x, Tensor):
        raise ArgumentTypeError(f"{fn}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise ArgumentTypeError(f"{fn}: input must be a floating-point tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    if x.device.type == "cpu" and x.dtype == torch.float16:
        raise ArgumentTypeError(f"{fn}: on the CPU the input must be float32, float64 or bfloat16, got {x.dtype}")


def _check_lengths(lengths: Optional[Tensor], T: int, B: int, device, fn: str) -> Optional[Tensor]:
    if lengths is None:
        return None
    if not isinstance(lengths, Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.dtype not in (torch.int32, torch.int64) or lengths.dim() != 1:
        raise ArgumentTypeError(f"{fn}: lengths must be a 1-D integer tensor, got {lengths.dtype} of shape {tuple(lengths.shape)}")
    if lengths.shape[0] != B:
        raise ArgumentError(f"{fn}: lengths must have one entry per sequence ({B}), got {lengths.shape[0]}")
    if B == 0:
        return lengths.to(device=device, dtype=torch.int64)
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 1 or hi > T:
        raise ArgumentError(f"{fn}: lengths must lie in [1, {T}] (the sequence length), got values in [{lo}, {hi}]")
    return lengths.to(device=device, dtype=torch.int64)


# --- public functions ------------------------------------------------------------------------

def _bias(b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> Optional[Tensor]:
    if b_ih is None and b_hh is None:
        return None
    if b_ih is None or b_hh is None:
        raise ArgumentError("b_ih and b_hh must both be given or both be None")
    return b_ih + b_hh


def _network(kind, input, hx, weights, num_layers, bidirectional, batch_first, dropout, training, lengths,
             relu=False):
    fn = "lstm" if kind == "lstm" else "rnn"
    _check_input(input, fn)
    if functorch_wrapped(input, *(hx if isinstance(hx, (tuple, list)) else (hx,)), *[t for w in weights for t in w]):
        raise RuntimeError(f"seqkernels.{fn}: torch.func transforms (grad, vmap, jacrev, ...) are not supported by "
                           "the fused recurrent kernels; use torch.autograd.grad, or the plain-PyTorch "
                           "seqkernels.reference implementations under torch.func")
    if input.dim() not in (2, 3):
        raise ArgumentError(f"{fn}: input must be 2-D (seq, feature) unbatched or 3-D, got shape {tuple(input.shape)}")
    D = 2 if bidirectional else 1
    if len(weights) != num_layers * D:
        raise ArgumentError(f"{fn}: expected {num_layers * D} weight tuples (num_layers x directions), got {len(weights)}")
    unbatched = input.dim() == 2
    x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if batch_first else input)
    T, B, feat = x.shape
    if T == 0:
        raise ArgumentError(f"{fn}: Expected sequence length to be larger than 0 in RNN, got shape {tuple(input.shape)}")
    G = 4 if kind == "lstm" else 1
    w0 = weights[0]
    H, P = w0[1].shape[0] // G, w0[1].shape[1]
    if w0[0].shape[1] != feat:
        raise ArgumentError(f"{fn}: input has {feat} features but w_ih of layer 0 expects {w0[0].shape[1]}")
    for k, w in enumerate(weights):
        for name, t in zip(("w_ih", "w_hh", "b_ih", "b_hh", "w_hr"), w):
            if t is not None:
                _check_tensor(f"{name} of weights[{k}]", t, x, fn=fn)
    lengths = _check_lengths(lengths, T, B, x.device, fn)
    # The LSTM keeps its autograd workspace only when a gradient can flow (inference skips it).
    workspace = kind == "lstm" and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, *(hx if isinstance(hx, (tuple, list)) else (hx,)),
                                                    *[p for w in weights for p in w]))

    if kind == "lstm":
        if hx is None:
            h0 = x.new_zeros(num_layers * D, B, P)
            c0 = x.new_zeros(num_layers * D, B, H)
        else:
            if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
                raise ArgumentTypeError("lstm: hx must be a tuple (h_0, c_0)")
            h0, c0 = hx
            if unbatched:
                h0, c0 = h0.unsqueeze(1) if h0.dim() == 2 else h0, c0.unsqueeze(1) if c0.dim() == 2 else c0
            _check_tensor("h_0", h0, x, (num_layers * D, B, P), fn)
            _check_tensor("c_0", c0, x, (num_layers * D, B, H), fn)
    else:
        if hx is None:
            h0 = x.new_zeros(num_layers * D, B, H)
        else:
            h0 = hx.unsqueeze(1) if unbatched and hx.dim() == 2 else hx
            _check_tensor("h_0", h0, x, (num_layers * D, B, H), fn)

    if B == 0:  # an empty batch, as torch: empty outputs and states
        out = x.new_zeros(T, 0, D * P)
        output = out.transpose(0, 1) if batch_first else out
        h_n = x.new_zeros(num_layers * D, 0, P)
        return (output, h_n) if kind == "rnn" else (output, (h_n, x.new_zeros(num_layers * D, 0, H)))
    finals_h, finals_c = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            k = layer * D + d
            w = weights[k]
            if kind == "lstm":
                w_ih, w_hh, b_ih, b_hh, w_hr = w
                y, hn, cn, *_ = _ops.lstm_layer_forward(x, h0[k], c0[k], w_ih, w_hh, _bias(b_ih, b_hh), w_hr,
                                                        lengths, d == 1, workspace)
                finals_c.append(cn)
            else:
                w_ih, w_hh, b_ih, b_hh = w
                y, hn, _ = _ops.rnn_layer_forward(x, h0[k], w_ih, w_hh, _bias(b_ih, b_hh), lengths, d == 1, relu)
            outs.append(y)
            finals_h.append(hn)
        x = outs[0] if D == 1 else torch.cat(outs, dim=-1)
        if dropout > 0 and training and layer < num_layers - 1:
            x = torch.nn.functional.dropout(x, dropout, training=True)
    output = x.squeeze(1) if unbatched else (x.transpose(0, 1) if batch_first else x)
    h_n = torch.stack(finals_h)
    if unbatched:
        h_n = h_n.squeeze(1)
    if kind == "rnn":
        return output, h_n
    c_n = torch.stack(finals_c)
    return output, (h_n, c_n.squeeze(1) if unbatched else c_n)


def lstm(input: Tensor, weights: Sequence[tuple], hx: Optional[tuple[Tensor, Tensor]] = None, *,
         num_layers: int = 1, bidirectional: bool = False, batch_first: bool = False, dropout: float = 0.0,
         training: bool = False, lengths: Optional[Tensor] = None):
    """A multi-layer LSTM over a sequence on the fused kernels; the math of ``torch.nn.LSTM``.

    Args:
        input: (T, B, I), (B, T, I) with ``batch_first``, or (T, I) unbatched.
        weights: one tuple ``(w_ih, w_hh, b_ih, b_hh, w_hr)`` per (layer, direction) in torch's
            order (biases and ``w_hr`` may be None); ``seqkernels.reference.weights_from_module``
            builds it from an ``nn.LSTM``.
        hx: (h_0 (L*D, B, P), c_0 (L*D, B, H)), zeros when None.
        lengths: optional (B,) valid lengths: steps t >= lengths[b] leave sequence b's state
            untouched and give zero output (PackedSequence semantics on padded input).

    Returns:
        (output (T, B, D*P), (h_n, c_n)), as ``torch.nn.LSTM``.
    """
    return _network("lstm", input, hx, weights, num_layers, bidirectional, batch_first, dropout, training, lengths)


def rnn(input: Tensor, weights: Sequence[tuple], hx: Optional[Tensor] = None, *, num_layers: int = 1,
        nonlinearity: str = "tanh", bidirectional: bool = False, batch_first: bool = False, dropout: float = 0.0,
        training: bool = False, lengths: Optional[Tensor] = None):
    """A multi-layer Elman RNN (tanh or relu) on the fused kernels; the math of ``torch.nn.RNN``.

    Arguments as :func:`lstm`, with weight tuples ``(w_ih, w_hh, b_ih, b_hh)`` and hx h_0
    (L*D, B, H). Returns (output, h_n).
    """
    if nonlinearity not in ("tanh", "relu"):
        raise ArgumentError(f"rnn: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    return _network("rnn", input, hx, weights, num_layers, bidirectional, batch_first, dropout, training, lengths,
                    relu=nonlinearity == "relu")


def _cell_state(name: str, h: Tensor, x: Tensor, batched: bool, hidden: int, fn: str, what: str) -> Tensor:
    """torch's checks of a cell's state: rank 1 (unbatched) or 2, batch and hidden size as
    the input's; returns it as (1, B, H) for the one-step layer. Never reshapes."""
    if not isinstance(h, Tensor):
        raise ArgumentTypeError(f"{fn}: {name} must be a torch.Tensor, got {type(h).__name__}")
    if h.dim() not in (1, 2):
        raise ArgumentError(f"{fn}: Expected {what} to be 1D or 2D, got {h.dim()}D instead")
    if batched and h.dim() != 2 or not batched and h.dim() != 1:
        raise ArgumentError(f"{fn}: for {'batched 2-D' if batched else 'unbatched 1-D'} input, {what} should also "
                            f"be {'2-D' if batched else '1-D'}, got {h.dim()}-D")
    h2 = h if batched else h.unsqueeze(0)
    if h2.shape[0] != x.shape[0]:
        raise ArgumentError(f"{fn}: Input batch size {x.shape[0]} doesn't match {name} batch size {h2.shape[0]}")
    if h2.shape[1] != hidden:
        raise ArgumentError(f"{fn}: {name} has inconsistent hidden_size: got {h2.shape[1]}, expected {hidden}")
    return h2.unsqueeze(0)


def _cell_input(input: Tensor, w_ih: Tensor, fn: str) -> Tensor:
    _check_input(input, fn)
    if input.dim() not in (1, 2):
        raise ArgumentError(f"{fn}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    if input.shape[-1] != w_ih.shape[1]:
        raise ArgumentError(f"{fn}: input has inconsistent input_size: got {input.shape[-1]} expected {w_ih.shape[1]}")
    return input.unsqueeze(0) if input.dim() == 1 else input


def lstm_cell(input: Tensor, hx: Optional[tuple[Tensor, Tensor]], w_ih: Tensor, w_hh: Tensor,
              b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """One fused LSTM step, the math of ``torch.nn.LSTMCell``: input (B, I) or (I,), hx
    (h (B, H), c (B, H)) (1-D for unbatched input) or None for zeros. Returns (h', c').

    The state is checked as torch checks it (rank, batch, hidden size), never reshaped. A
    batch of 0 or a hidden size of 0 gives empty results, as torch does."""
    fn = "lstm_cell"
    x = _cell_input(input, w_ih, fn)
    batched, H = input.dim() == 2, w_hh.shape[1]
    hx_ = None
    if hx is not None:
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise ArgumentTypeError(f"{fn}: hx must be a tuple (h, c)")
        hx_ = (_cell_state("hidden0", hx[0], x, batched, H, fn, "hx[0]"),
               _cell_state("hidden1", hx[1], x, batched, H, fn, "hx[1]"))
    if x.shape[0] == 0 or H == 0:  # nothing to compute: torch's own cell gives the empty results
        zeros = x.new_zeros(x.shape[0], H)
        h, c = torch.lstm_cell(x, (zeros, zeros) if hx_ is None else (hx_[0][0], hx_[1][0]), w_ih, w_hh, b_ih, b_hh)
    else:
        _, (h, c) = lstm(x.unsqueeze(0), [(w_ih, w_hh, b_ih, b_hh, None)], hx_)
        h, c = h[0], c[0]
    return (h[0], c[0]) if not batched else (h, c)


def rnn_cell(input: Tensor, hx: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
             b_hh: Optional[Tensor] = None, nonlinearity: str = "tanh") -> Tensor:
    """One fused Elman RNN step, the math of ``torch.nn.RNNCell``: input (B, I) or (I,), hx
    (B, H) or (H,) or None for zeros. Returns h'. The state is checked as torch checks it."""
    fn = "rnn_cell"
    x = _cell_input(input, w_ih, fn)
    batched, H = input.dim() == 2, w_hh.shape[1]
    hx_ = None if hx is None else _cell_state("hidden0", hx, x, batched, H, fn, "hidden")
    if x.shape[0] == 0 or H == 0:
        cell = torch.rnn_tanh_cell if nonlinearity == "tanh" else torch.rnn_relu_cell
        h = cell(x, x.new_zeros(x.shape[0], H) if hx_ is None else hx_[0], w_ih, w_hh, b_ih, b_hh)
        return h if batched else h[0]
    _, h = rnn(x.unsqueeze(0), [(w_ih, w_hh, b_ih, b_hh)], hx_, nonlinearity=nonlinearity)
    return h[0, 0] if not batched else h[0]


for _f in (lstm, rnn, lstm_cell, rnn_cell):
    script_unsupported(_f, f"seqkernels.{_f.__name__}")
