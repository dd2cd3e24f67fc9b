"""Named benchmark cases: ``build_case(name, params, device)`` returns a function that runs
one measured call. The inputs are built before it, so they are not counted as the call's
memory; a backward returns its gradients (they are counted) and keeps nothing.

Cases:
  alloc                         a known allocation of ``params["bytes"]`` bytes (written)
  attention.scores              the reference's score matrix alone: q @ k^T
  attention.{reference,sdpa,seqkernels}
                                attention with params B, H, L (= Lq = Lk), D, causal,
                                backward, dtype
  attention.sdpa_{flash,efficient,cudnn,math}
                                torch SDPA held to one backend (torch.nn.attention.sdpa_kernel);
                                a backend that cannot take the inputs raises
  attention_padded.{seqkernels,seqkernels_lengths,sdpa}
                                attention with a key-padding mask: params B, H, L, D,
                                keep (the fraction of keys that are not padding, the same
                                for every sequence), backward. seqkernels and sdpa get the
                                same boolean (B, 1, 1, L) mask; seqkernels_lengths gets the
                                key lengths instead
  mha.{seqkernels,torch}        nn.MultiheadAttention self-attention, batch_first, with a
                                key_padding_mask: params B, L, E, heads, keep, backward
                                (need_weights=False; forward in eval mode under no_grad,
                                where torch takes its fused fast path)
  lstm.{seqkernels,torch,cell_loop,reference}
  rnn.{seqkernels,torch,cell_loop,reference}
                                a one-layer LSTM / tanh RNN with params T, B, I, H,
                                backward: the fused kernels, torch.nn.LSTM / RNN
                                (oneDNN/cuDNN), torch.nn.LSTMCell / RNNCell stepped in a
                                Python loop, and the reference
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


def _attention_inputs(p: dict, device: str):
    dtype = DTYPES[p.get("dtype", "float32")]
    shape = (p.get("B", 1), p.get("H", 8), p["L"], p.get("D", 64))
    grad = bool(p.get("backward", False))
    q, k, v = (torch.randn(shape, dtype=dtype, device=device, requires_grad=grad) for _ in range(3))
    return q, k, v


def attention_impl(name: str):
    """(q, k, v, causal) -> out for each attention implementation."""
    import seqkernels
    from seqkernels import reference as ref

    if name == "reference":
        return lambda q, k, v, causal: ref.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if name == "sdpa":
        return lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if name == "seqkernels":
        return lambda q, k, v, causal: seqkernels.flash_attention(q, k, v, causal=causal)
    if name.startswith("sdpa_"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name[len("sdpa_"):]]

        def one_backend(q, k, v, causal):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return one_backend
    raise KeyError(name)


def build_case(name: str, p: dict, device: str):
    if name == "alloc":
        n = int(p["bytes"]) // 4

        def fn():
            t = torch.empty(n, dtype=torch.float32, device=device)
            t.fill_(1.0)
            return t

        return fn

    if name == "attention.scores":
        q, k, _ = _attention_inputs(p, device)
        return lambda: torch.matmul(q, k.transpose(-2, -1))

    if name.startswith("attention."):
        impl = attention_impl(name.split(".", 1)[1])
        q, k, v = _attention_inputs(p, device)
        causal = bool(p.get("causal", False))
        if not p.get("backward", False):
            def fwd():
                with torch.no_grad():
                    return impl(q, k, v, causal)
            return fwd
        go = torch.randn(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=device)

        def fwd_bwd():  # gradients are returned, not stored: no state survives the call
            return torch.autograd.grad(impl(q, k, v, causal), (q, k, v), go)

        return fwd_bwd

    if name.startswith("attention_padded."):
        return _padded_attention_case(name.split(".", 1)[1], p, device)

    if name.startswith("mha."):
        return _mha_case(name.split(".", 1)[1], p, device)

    if name.startswith(("lstm.", "rnn.")):
        family, impl = name.split(".", 1)
        return _recurrent_case(family, impl, p, device)

    raise KeyError(f"unknown case {name!r}")


def _padding(p: dict, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(lengths (B,), key_padding (B, L) True = padding) keeping ``keep`` of the L keys."""
    B, L = p.get("B", 1), p["L"]
    lengths = torch.full((B,), max(1, round(p.get("keep", 0.5) * L)), dtype=torch.int64, device=device)
    return lengths, torch.arange(L, device=device) >= lengths[:, None]


def _grad_or_no_grad(fn, inputs, p: dict, device: str):
    if not p.get("backward", False):
        def fwd():
            with torch.no_grad():
                return fn()
        return fwd
    out_shape = fn().shape

    go = torch.randn(out_shape, dtype=inputs[0].dtype, device=device)

    def fwd_bwd():
        return torch.autograd.grad(fn(), inputs, go)

    return fwd_bwd


def _padded_attention_case(impl: str, p: dict, device: str):
    import seqkernels

    q, k, v = _attention_inputs(p, device)
    lengths, padding = _padding(p, device)
    mask = (~padding)[:, None, None, :]
    fns = {
        "seqkernels": lambda: seqkernels.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        "seqkernels_lengths": lambda: seqkernels.flash_attention(q, k, v, key_lengths=lengths),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
    }
    return _grad_or_no_grad(fns[impl], (q, k, v), p, device)


def _mha_case(impl: str, p: dict, device: str):
    import seqkernels

    dtype = DTYPES[p.get("dtype", "float32")]
    E, heads = p.get("E", 512), p.get("heads", 8)
    cls = seqkernels.nn.MultiheadAttention if impl == "seqkernels" else torch.nn.MultiheadAttention
    torch.manual_seed(0)
    m = cls(E, heads, batch_first=True, device=device, dtype=dtype)
    backward = bool(p.get("backward", False))
    m.train(backward)
    x = torch.randn(p.get("B", 1), p["L"], E, dtype=dtype, device=device, requires_grad=backward)
    _, padding = _padding(p, device)
    fn = lambda: m(x, x, x, key_padding_mask=padding, need_weights=False)[0]  # noqa: E731
    return _grad_or_no_grad(fn, (x, *m.parameters()), p, device)


def _recurrent_case(family: str, impl: str, p: dict, device: str):
    import seqkernels
    from seqkernels import reference as ref

    T, B, I, H = p.get("T", 100), p.get("B", 64), p.get("I", 512), p.get("H", 512)
    dtype = DTYPES[p.get("dtype", "float32")]
    backward = bool(p.get("backward", False))
    lstm = family == "lstm"
    torch.manual_seed(0)
    module = (torch.nn.LSTM if lstm else torch.nn.RNN)(I, H).to(device=device, dtype=dtype)
    cell = (torch.nn.LSTMCell if lstm else torch.nn.RNNCell)(I, H).to(device=device, dtype=dtype)
    x = torch.randn(T, B, I, device=device, dtype=dtype, requires_grad=backward)
    weights = ref.weights_from_module(module)
    fused, textbook = (seqkernels.lstm, ref.lstm) if lstm else (seqkernels.rnn, ref.rnn)
    if impl == "seqkernels":
        run = lambda: fused(x, weights)[0]  # noqa: E731
    elif impl == "torch":
        run = lambda: module(x)[0]  # noqa: E731
    elif impl == "reference":
        run = lambda: textbook(x, weights)[0]  # noqa: E731
    elif impl == "cell_loop":
        def run():
            h = x.new_zeros(B, H)
            state = (h, x.new_zeros(B, H)) if lstm else h
            outs = []
            for t in range(T):
                state = cell(x[t], state)
                outs.append(state[0] if lstm else state)
            return torch.stack(outs)
    else:
        raise KeyError(f"unknown {family} implementation {impl!r}")
    params = [x] + (list(cell.parameters()) if impl == "cell_loop" else list(module.parameters()))
    if not backward:
        def fwd():
            with torch.no_grad():
                return run()
        return fwd
    go = torch.randn(T, B, H, device=device, dtype=dtype)
    return lambda: torch.autograd.grad(run(), params, go)


def lstm_flops(T: int, B: int, I: int, H: int, backward: bool = False, gates: int = 4) -> float:
    """2 * G*H * (I + H) per step and sequence forward (G = 4 gates for the LSTM, 1 for the
    RNN); the backward does twice that."""
    f = 2.0 * T * B * gates * H * (I + H)
    return 3 * f if backward else f
