"""Direct op calls with one wrong argument each, run in a child process by
test_direct_ops.py (a crash there fails the tests instead of killing the run).

``python -m tests.conformance.direct_op_cases OP`` prints one JSON object: case name ->
[exception type, message], or null where the call returned.
"""

from __future__ import annotations

import json
import sys

import torch

import seqkernels  # noqa: F401  (registers the ops)

ops = torch.ops.seqkernels


def attention_forward_cases():
    q, k, v = (torch.randn(2, 4, n, 8) for n in (5, 7, 7))
    ok = dict(causal=False, bottom_right=True, scale=0.3)

    def fwd(q=q, k=k, v=v, **kw):
        a = {**ok, **kw}
        return lambda: ops.flash_attention_forward(q, k, v, a["causal"], a["bottom_right"], a["scale"],
                                                   a.get("attn_mask"), a.get("key_lengths"), a.get("dropout_p", 0.0),
                                                   a.get("rng_state"))

    return {
        "q 3-D": fwd(q=q[0]),
        "k batch": fwd(k=k[:1], v=v[:1]),
        "k heads": fwd(k=k[:, :3], v=v[:, :3]),
        "v length": fwd(v=v[:, :, :6]),
        "k head dim": fwd(k=k[..., :4]),
        "head dim 0": fwd(q=q[..., :0], k=k[..., :0]),
        "v head dim 0": fwd(v=v[..., :0]),
        "dtype": fwd(k=k.double()),
        "int dtype": fwd(q=q.int(), k=k.int(), v=v.int()),
        "mask shape": fwd(attn_mask=torch.ones(2, 4, 6, 7, dtype=torch.bool)),
        "mask 2-D": fwd(attn_mask=torch.ones(5, 7, dtype=torch.bool)),
        "mask dtype": fwd(attn_mask=torch.zeros(1, 1, 5, 7, dtype=torch.float64)),
        "key_lengths shape": fwd(key_lengths=torch.tensor([7])),
        "key_lengths dtype": fwd(key_lengths=torch.tensor([7, 7], dtype=torch.int32)),
        "key_lengths negative": fwd(key_lengths=torch.tensor([7, -5])),
        "key_lengths past Lk": fwd(key_lengths=torch.tensor([7, 2**40])),
        "dropout without rng_state": fwd(dropout_p=0.5),
        "rng_state shape": fwd(dropout_p=0.5, rng_state=torch.tensor([1, 2, 3])),
        "dropout_p 1": fwd(dropout_p=1.0, rng_state=torch.tensor([1, 0])),
    }


def attention_backward_cases():
    B = H = 64  # a wrong batch/heads here used to segfault
    q, k, v = (torch.randn(B, H, n, 8) for n in (5, 7, 7))
    out, lse = ops.flash_attention_forward(q, k, v, False, True, 0.3)
    go = torch.randn_like(out)

    def bwd(go=go, glse=None, q=q, k=k, v=v, out=out, lse=lse, **kw):
        return lambda: ops.flash_attention_backward(go, glse, q, k, v, out, lse, False, True, 0.3,
                                                    kw.get("attn_mask"), kw.get("key_lengths"))

    return {
        "grad_out batch": bwd(go=go[:2]),
        "grad_out heads": bwd(go=go[:, :2]),
        "grad_out length": bwd(go=go[:, :, :3]),
        "grad_out dtype": bwd(go=go.double()),
        "out batch": bwd(out=out[:2]),
        "out heads": bwd(out=out[:, :1]),
        "lse batch": bwd(lse=lse[:2]),
        "lse heads": bwd(lse=lse[:, :1]),
        "lse length": bwd(lse=lse[..., :3]),
        "lse int": bwd(lse=lse.int()),
        "grad_lse (Lq,)": bwd(glse=torch.randn(5)),
        "grad_lse heads": bwd(glse=torch.randn(B, 1, 5)),
        "key_lengths past Lk": bwd(key_lengths=torch.full((B,), 8)),
        "q heads not a multiple": bwd(k=k[:, :3], v=v[:, :3]),
    }


def _lstm(T=5, B=3, I=4, H=6, P=None):
    P = P or H
    x, h0, c0 = torch.randn(T, B, I), torch.randn(B, P), torch.randn(B, H)
    w_ih, w_hh, bias = torch.randn(4 * H, I), torch.randn(4 * H, P), torch.randn(4 * H)
    return x, h0, c0, w_ih, w_hh, bias


def lstm_forward_cases():
    x, h0, c0, w_ih, w_hh, bias = _lstm()

    def f(x=x, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, bias=bias, w_hr=None, lengths=None):
        return lambda: ops.lstm_layer_forward(x, h0, c0, w_ih, w_hh, bias, w_hr, lengths, False)

    return {
        "x 2-D": f(x=x[0]),
        "h0 batch": f(h0=h0[:2]),
        "c0 batch": f(c0=c0[:2]),
        "c0 hidden": f(c0=c0[:, :5]),
        "w_ih columns": f(w_ih=w_ih[:, :3]),
        "w_hh rows": f(w_hh=w_hh[:20]),
        "bias size": f(bias=bias[:10]),
        "bias dtype": f(bias=bias.double()),
        "w_hr shape": f(w_hr=torch.randn(3, 5)),
        "no w_hr with P != H": f(h0=torch.randn(3, 4), w_hh=torch.randn(24, 4)),
        "lengths 2^62": f(lengths=torch.tensor([5, 2**62, 3])),
        "lengths 0": f(lengths=torch.tensor([5, 0, 3])),
        "lengths shape": f(lengths=torch.tensor([5, 5])),
        "lengths dtype": f(lengths=torch.tensor([5, 5, 5], dtype=torch.int32)),
        "batch 0": f(x=x[:, :0], h0=h0[:0], c0=c0[:0]),
    }


def lstm_backward_cases():
    x, h0, c0, w_ih, w_hh, bias = _lstm()
    y, hn, cn, gates, hs, cs, rs = ops.lstm_layer_forward(x, h0, c0, w_ih, w_hh, bias, None, None, False)
    gy, ghn, gcn = torch.randn_like(y), torch.randn_like(hn), torch.randn_like(cn)

    def f(gy=gy, ghn=ghn, gcn=gcn, gates=gates, y=y, hs=hs, cs=cs, rs=rs, w_hr=None, lengths=None):
        return lambda: ops.lstm_layer_backward(gy, ghn, gcn, x, h0, c0, w_ih, w_hh, w_hr, lengths, False, gates, y,
                                               hs, cs, rs, True)

    return {
        "grad_y steps": f(gy=gy[:2]),
        "grad_h_n batch": f(ghn=ghn[:1]),
        "grad_c_n hidden": f(gcn=gcn[:, :2]),
        "gates steps": f(gates=gates[:2]),
        "gates width": f(gates=gates[..., :8]),
        "y steps": f(y=y[:1]),
        "cs steps": f(cs=cs[:3]),
        "hs steps with lengths": f(hs=hs, lengths=torch.tensor([5, 4, 3])),
        "rs with w_hr": f(w_hr=torch.randn(6, 6), rs=rs),
        "gates dtype": f(gates=gates.double()),
    }


def rnn_cases():
    T, B, I, H = 5, 3, 4, 6
    x, h0, w_ih, w_hh, bias = torch.randn(T, B, I), torch.randn(B, H), torch.randn(H, I), torch.randn(H, H), torch.randn(H)
    y, hn, hs = ops.rnn_layer_forward(x, h0, w_ih, w_hh, bias, None, False, False)
    gy, ghn = torch.randn_like(y), torch.randn_like(hn)

    def fwd(h0=h0, w_hh=w_hh, bias=bias, lengths=None):
        return lambda: ops.rnn_layer_forward(x, h0, w_ih, w_hh, bias, lengths, False, False)

    def bwd(gy=gy, ghn=ghn, y=y, hs=hs, lengths=None):
        return lambda: ops.rnn_layer_backward(gy, ghn, x, h0, w_ih, w_hh, lengths, False, False, y, hs, True)

    return {
        "forward h0 hidden": fwd(h0=h0[:, :4]),
        "forward w_hh not square": fwd(w_hh=torch.randn(6, 5), h0=torch.randn(3, 5)),
        "forward bias size": fwd(bias=bias[:2]),
        "forward lengths past T": fwd(lengths=torch.tensor([5, 6, 1])),
        "backward grad_y steps": bwd(gy=gy[:2]),
        "backward grad_h_n batch": bwd(ghn=ghn[:2]),
        "backward y steps": bwd(y=y[:3]),
        "backward hs steps with lengths": bwd(hs=hs, lengths=torch.tensor([5, 4, 3])),
    }


CASES = {
    "flash_attention_forward": attention_forward_cases,
    "flash_attention_backward": attention_backward_cases,
    "lstm_layer_forward": lstm_forward_cases,
    "lstm_layer_backward": lstm_backward_cases,
    "rnn_layer": rnn_cases,
}


def main(op: str) -> None:
    results = {}
    for name, call in CASES[op]().items():
        try:
            call()
            results[name] = None
        except Exception as e:  # noqa: BLE001
            results[name] = [type(e).__name__, str(e).splitlines()[0]]
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
