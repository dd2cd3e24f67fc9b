"""Reference recurrent networks: the textbook equations in plain PyTorch.

These are the oracles of the tests: short, differentiable, exact in float64. They use the
layout and gate order of ``torch.nn.RNN`` / ``torch.nn.LSTM`` so that weights load unchanged.

Weights of a whole network are given as a list with one entry per (layer, direction),
in torch's order (layer 0 forward, layer 0 reverse, layer 1 forward, ...). Each entry is a
tuple ``(w_ih, w_hh, b_ih, b_hh)`` for the RNN, ``(w_ih, w_hh, b_ih, b_hh, w_hr)`` for the
LSTM; biases and ``w_hr`` may be ``None``. :func:`weights_from_module` builds that list
from a ``torch.nn`` module.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def _linear(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    y = x @ w.t()
    return y if b is None else y + b


def rnn_cell(
    x: Tensor,
    h: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    nonlinearity: str = "tanh",
) -> Tensor:
    """One step of the Elman RNN.

    h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh), with act = tanh or relu.

    Shapes: x (B, I), h (B, H), w_ih (H, I), w_hh (H, H), biases (H,). Returns h' (B, H).
    """
    pre = _linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh)
    if nonlinearity == "tanh":
        return torch.tanh(pre)
    if nonlinearity == "relu":
        return torch.relu(pre)
    raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")


def lstm_cell(
    x: Tensor,
    state: tuple[Tensor, Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    w_hr: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """One step of the LSTM, gates in torch's order i, f, g, o.

    z = x W_ih^T + b_ih + h W_hh^T + b_hh, split into four (B, H) blocks z_i, z_f, z_g, z_o;
    i = sigmoid(z_i), f = sigmoid(z_f), g = tanh(z_g), o = sigmoid(z_o);
    c' = f * c + i * g;  h' = o * tanh(c');  with a projection (LSTMP) h' = (o * tanh(c')) W_hr^T.

    Shapes: x (B, I), h (B, P) where P = proj_size or H, c (B, H), w_ih (4H, I),
    w_hh (4H, P), biases (4H,), w_hr (P, H). Returns (h', c').
    """
    h, c = state
    z = _linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh)
    z_i, z_f, z_g, z_o = z.chunk(4, dim=-1)
    i, f, g, o = torch.sigmoid(z_i), torch.sigmoid(z_f), torch.tanh(z_g), torch.sigmoid(z_o)
    c_new = f * c + i * g
    h_new = o * torch.tanh(c_new)
    if w_hr is not None:
        h_new = h_new @ w_hr.t()
    return h_new, c_new


def _run_direction(step, x: Tensor, state, reverse: bool, lengths: Optional[Tensor]):
    """Run ``step`` over time (x is (T, B, I)); returns outputs (T, B, *) and the final state.

    With ``lengths``, steps at t >= lengths[b] leave sequence b's state untouched and give a
    zero output; the reverse direction then starts at each sequence's own last step.
    """
    T = x.shape[0]
    outputs: list[Tensor] = [None] * T  # type: ignore[list-item]
    order = range(T - 1, -1, -1) if reverse else range(T)
    for t in order:
        new_state = step(x[t], state)
        h_new = new_state[0] if isinstance(new_state, tuple) else new_state
        if lengths is not None:
            alive = (t < lengths).to(x.dtype).unsqueeze(1)  # (B, 1)
            if isinstance(new_state, tuple):
                new_state = tuple(alive * n + (1 - alive) * s for n, s in zip(new_state, state))
            else:
                new_state = alive * new_state + (1 - alive) * state
            h_new = alive * h_new
        outputs[t] = h_new
        state = new_state
    return torch.stack(outputs), state


def _run_network(input, hx, weights, num_layers, bidirectional, batch_first, dropout, training,
                 lengths, make_step, zero_state):
    if input.dim() not in (2, 3):
        raise ValueError(f"input must be 2-D (unbatched) or 3-D, got shape {tuple(input.shape)}")
    unbatched = input.dim() == 2
    x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if batch_first else input)
    hx = _batch_states(hx, unbatched)
    D = 2 if bidirectional else 1
    if len(weights) != num_layers * D:
        raise ValueError(f"expected {num_layers * D} weight tuples, got {len(weights)}")
    finals = []
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            k = layer * D + d
            state = zero_state(x, weights[k]) if hx is None else _index_states(hx, k)
            out, state = _run_direction(make_step(weights[k]), x, state, reverse=d == 1, lengths=lengths)
            outs.append(out)
            finals.append(state)
        x = torch.cat(outs, dim=-1)
        if dropout > 0 and training and layer < num_layers - 1:
            x = torch.nn.functional.dropout(x, dropout, training=True)
    output = x.squeeze(1) if unbatched else (x.transpose(0, 1) if batch_first else x)
    return output, finals, unbatched


def _batch_states(hx, unbatched):
    if hx is None or not unbatched:
        return hx
    return tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(1)


def _index_states(hx, k):
    return tuple(h[k] for h in hx) if isinstance(hx, tuple) else hx[k]


def rnn(
    input: Tensor,
    weights: Sequence[tuple],
    hx: Optional[Tensor] = None,
    *,
    num_layers: int = 1,
    nonlinearity: str = "tanh",
    bidirectional: bool = False,
    batch_first: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    lengths: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """A multi-layer Elman RNN over a sequence, as ``torch.nn.RNN``.

    input: (T, B, I), or (B, T, I) with ``batch_first``, or (T, I) unbatched.
    hx: (num_layers * D, B, H) (or (num_layers * D, H) unbatched), zeros when None.
    lengths: optional (B,) tensor of valid lengths (see :func:`_run_direction`).
    Returns (output (T, B, D*H), h_n (num_layers * D, B, H)).
    """

    def make_step(w):
        w_ih, w_hh, b_ih, b_hh = w
        return lambda x, h: rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity)

    def zero_state(x, w):
        return x.new_zeros(x.shape[1], w[1].shape[0])

    output, finals, unbatched = _run_network(
        input, hx, weights, num_layers, bidirectional, batch_first, dropout, training, lengths,
        make_step, zero_state)
    h_n = torch.stack(finals)
    return output, (h_n.squeeze(1) if unbatched else h_n)


def lstm(
    input: Tensor,
    weights: Sequence[tuple],
    hx: Optional[tuple[Tensor, Tensor]] = None,
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    batch_first: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    lengths: Optional[Tensor] = None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """A multi-layer LSTM (optionally with projections) over a sequence, as ``torch.nn.LSTM``.

    input: (T, B, I), or (B, T, I) with ``batch_first``, or (T, I) unbatched.
    hx: (h_0 (num_layers * D, B, P), c_0 (num_layers * D, B, H)), zeros when None;
    P = proj_size when the weights carry w_hr, else H.
    Returns (output (T, B, D*P), (h_n, c_n)).
    """

    def make_step(w):
        w_ih, w_hh, b_ih, b_hh, w_hr = w
        return lambda x, s: lstm_cell(x, s, w_ih, w_hh, b_ih, b_hh, w_hr)

    def zero_state(x, w):
        hidden = w[1].shape[0] // 4
        proj = w[1].shape[1]
        return x.new_zeros(x.shape[1], proj), x.new_zeros(x.shape[1], hidden)

    output, finals, unbatched = _run_network(
        input, hx, weights, num_layers, bidirectional, batch_first, dropout, training, lengths,
        make_step, zero_state)
    h_n = torch.stack([s[0] for s in finals])
    c_n = torch.stack([s[1] for s in finals])
    if unbatched:
        h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
    return output, (h_n, c_n)


def weights_from_module(module: torch.nn.Module) -> list[tuple]:
    """The per-(layer, direction) weight tuples of a ``torch.nn.RNN`` or ``torch.nn.LSTM``."""
    is_lstm = isinstance(module, torch.nn.LSTM)
    D = 2 if module.bidirectional else 1
    weights = []
    for layer in range(module.num_layers):
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d == 1 else "")
            w = [getattr(module, "weight_ih" + sfx), getattr(module, "weight_hh" + sfx)]
            w += [getattr(module, "bias_ih" + sfx, None), getattr(module, "bias_hh" + sfx, None)]
            if is_lstm:
                w.append(getattr(module, "weight_hr" + sfx, None))
            weights.append(tuple(w))
    return weights
