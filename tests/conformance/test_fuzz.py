"""A bounded property test of the drop-ins against torch's own functions over random
shapes, layouts (transposed views, stride-0 expands), masks of every broadcast, GQA and
dtypes. The quick profile runs in `make test`; `pytest -m slow` runs a long one."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import seqkernels

from .helpers import torch_math_sdpa

QUICK = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
LONG = settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (2e-5, 2e-5)}


def _layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values in another memory layout."""
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "expanded" and t.shape[0] >= 1:
        return t[:1].expand(t.shape)  # stride 0 over the batch (its rows are then equal)
    return t


@st.composite
def sdpa_cases(draw):
    B, Hk = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    G = draw(st.sampled_from([1, 1, 2, 3]))
    L, S = draw(st.integers(0, 33)), draw(st.integers(0, 33))
    E, Ev = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    mask_kind = draw(st.sampled_from(["none", "bool", "float", "causal"]))
    mask_dims = [draw(st.booleans()) for _ in range(4)]  # which of (B, H, L, S) the mask spans
    layouts = [draw(st.sampled_from(["contiguous", "transposed", "expanded"])) for _ in range(3)]
    scale = draw(st.sampled_from([None, 0.1, 1.7]))
    seed = draw(st.integers(0, 2**31 - 1))
    return B, Hk, G, L, S, E, Ev, dtype, mask_kind, mask_dims, layouts, scale, seed


def _check_sdpa(case):
    B, Hk, G, L, S, E, Ev, dtype, mask_kind, mask_dims, layouts, scale, seed = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hk * G, L, E, generator=g, dtype=dtype)
    k = torch.randn(B, Hk, S, E, generator=g, dtype=dtype)
    v = torch.randn(B, Hk, S, Ev, generator=g, dtype=dtype)
    q, k, v = (_layout(t, kind) for t, kind in zip((q, k, v), layouts))
    mask, causal = None, mask_kind == "causal"
    if mask_kind in ("bool", "float"):
        shape = [n if keep else 1 for n, keep in zip((B, Hk * G, L, S), mask_dims)]
        while len(shape) > 2 and shape[0] == 1 and torch.rand(1, generator=g).item() < 0.5:
            shape = shape[1:]  # a lower-rank mask that broadcasts
        if mask_kind == "bool":
            mask = torch.rand(shape, generator=g) > 0.3
        else:
            mask = torch.randn(shape, generator=g, dtype=dtype).masked_fill(torch.rand(shape, generator=g) < 0.2,
                                                                            float("-inf"))
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = seqkernels.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=causal, scale=scale,
                                                  enable_gqa=G > 1)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    m64 = mask.double() if mask is not None and mask.dtype != torch.bool else mask
    ref = torch_math_sdpa(q64, k64, v64, attn_mask=m64, is_causal=causal, scale=scale, enable_gqa=G > 1)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    if ref.numel():
        w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
        (out.double() * w).sum().backward()
        (ref * w).sum().backward()
        for a, e in zip((qs, ks, vs), (q64, k64, v64)):
            torch.testing.assert_close(a.grad.double(), e.grad, rtol=rtol * 10, atol=atol * 10)


@QUICK
@given(sdpa_cases())
def test_sdpa_fuzz(case):
    _check_sdpa(case)


@pytest.mark.slow
@LONG
@given(sdpa_cases())
def test_sdpa_fuzz_long(case):
    _check_sdpa(case)


@st.composite
def lstm_cases(draw):
    return dict(T=draw(st.integers(1, 6)), B=draw(st.integers(0, 4)), I=draw(st.integers(1, 7)),
                H=draw(st.integers(1, 7)), layers=draw(st.integers(1, 2)), bidirectional=draw(st.booleans()),
                batch_first=draw(st.booleans()), proj=draw(st.booleans()), rnn=draw(st.booleans()),
                hx=draw(st.booleans()), transposed=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


def _check_recurrent(c):
    torch.manual_seed(c["seed"])
    kw = dict(num_layers=c["layers"], bidirectional=c["bidirectional"], batch_first=c["batch_first"])
    if c["rnn"]:
        theirs = torch.nn.RNN(c["I"], c["H"], **kw).double()
        ours = seqkernels.nn.RNN(c["I"], c["H"], **kw).double()
    else:
        P = max(1, c["H"] - 1) if c["proj"] and c["H"] > 1 else 0
        theirs = torch.nn.LSTM(c["I"], c["H"], proj_size=P, **kw).double()
        ours = seqkernels.nn.LSTM(c["I"], c["H"], proj_size=P, **kw).double()
    ours.load_state_dict(theirs.state_dict())
    T, B = c["T"], c["B"]
    x = torch.randn((B, T, c["I"]) if c["batch_first"] else (T, B, c["I"]), dtype=torch.float64)
    if c["transposed"]:
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    hx = None
    if c["hx"]:
        D = 2 if c["bidirectional"] else 1
        h = torch.randn(c["layers"] * D, B, theirs.proj_size or c["H"], dtype=torch.float64)
        hx = h if c["rnn"] else (h, torch.randn(c["layers"] * D, B, c["H"], dtype=torch.float64))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, e = ours(xa, hx), theirs(xb, hx)
    flat = lambda r: [r[0], *(r[1] if isinstance(r[1], tuple) else (r[1],))]  # noqa: E731
    for u, w in zip(flat(a), flat(e)):
        torch.testing.assert_close(u, w, rtol=1e-9, atol=1e-9)
    if B:
        sum((t * torch.cos(torch.arange(t.numel(), dtype=t.dtype)).reshape(t.shape)).sum() for t in flat(a)).backward()
        sum((t * torch.cos(torch.arange(t.numel(), dtype=t.dtype)).reshape(t.shape)).sum() for t in flat(e)).backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-9)
        for p, r in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-9, atol=1e-9)


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(lstm_cases())
def test_recurrent_fuzz(c):
    _check_recurrent(c)


@pytest.mark.slow
@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(lstm_cases())
def test_recurrent_fuzz_long(c):
    _check_recurrent(c)
