"""Sliding windows (flash-attn's window_size): query i sees keys i + off - left .. i + off +
right (off = Lk - Lq, the causal mask's bottom-right alignment), in the CPU kernel's forward,
backward and decode regime, against the float64 reference with the same window."""

import pytest
import torch

import seqkernels
from seqkernels import reference as ref
from seqkernels.profiling.timing import measure_times_interleaved

from .test_attention import make
from .test_attention_masks import check_flash
from .test_attention_softcap import option_inputs

OPS = torch.ops.seqkernels

# the forward's key tiles are 384 keys (D <= 64), the backward's 64: windows at tile - 1,
# tile, tile + 1
WINDOWS = [(0, 0), (3, -1), (-1, 2), (5, 7), (63, 0), (64, 0), (65, 0), (383, -1), (384, 0), (385, 1), (-1, -1)]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("causal", [False, True])
def test_window_matches_reference_float64(window, causal):
    q, k, v = make(1, 4, 2, 517, 901, 16, dtype=torch.float64)
    check_flash(q, k, v, causal=causal, window=window)


@pytest.mark.parametrize("B, H, Hk, Lq, Lk", [(2, 8, 2, 1, 1000), (1, 4, 1, 3, 700), (2, 4, 4, 37, 37)])
@pytest.mark.parametrize("window", [(100, 0), (0, 5), (300, 300)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_window_decode_and_small_shapes(B, H, Hk, Lq, Lk, window, dtype):
    check_flash(*make(B, H, Hk, Lq, Lk, 32, dtype=dtype), causal=True, window=window)


@pytest.mark.parametrize("kind", ["bool", "float", "lengths", "dropout", "softcap"])
def test_window_with_masks_dropout_softcap(kind):
    q, k, v = make(2, 4, 2, 130, 211, 16, dtype=torch.float64)
    check_flash(q, k, v, causal=True, window=(40, 0), **option_inputs(kind, 2, 4, 130, 211))


def test_window_gradcheck():
    q, k, v = make(1, 2, 1, 9, 11, 4, dtype=torch.float64)
    torch.autograd.gradcheck(lambda q, k, v: seqkernels.flash_attention(q, k, v, window=(2, 1)), (q, k, v))


def test_rows_outside_every_window_are_zero():
    # Lq > Lk bottom-right: the first rows' windows end before key 0
    q, k, v = make(1, 1, 1, 12, 4, 8, dtype=torch.float64)
    out, lse = seqkernels.flash_attention(q, k, v, window=(1, 0), return_lse=True)
    assert (out[0, 0, :7] == 0).all() and torch.isinf(lse[0, 0, :7]).all()
    e, _ = ref.flash_attention(q, k, v, window=(1, 0))
    torch.testing.assert_close(out[0, 0, 7:], e[0, 0, 7:], rtol=1e-12, atol=1e-12)


def test_window_opcheck_and_compile():
    q, k, v = (t.detach() for t in make(1, 4, 2, 9, 13, 8, dtype=torch.float32))
    args = (q, k, v, True, True, 0.3, None, None, 0.0, None, 0.0, 3, 0)
    torch.library.opcheck(OPS.flash_attention_forward, args)
    out, lse = OPS.flash_attention_forward(*args)
    torch.library.opcheck(OPS.flash_attention_backward, (torch.randn_like(out), None, q, k, v, out, lse, True, True,
                                                         0.3, None, None, 0.0, None, 0.0, 3, 0))
    f = torch.compile(lambda q, k, v: seqkernels.flash_attention(q, k, v, causal=True, window=(3, 0)), fullgraph=True)
    torch.testing.assert_close(f(q, k, v), seqkernels.flash_attention(q, k, v, causal=True, window=(3, 0)))


def test_window_skips_tiles():
    """A window of 256 at L = 8192 costs a fraction of full causal attention (O(L w), not
    O(L^2)): the windowed forward is at least 3x faster (about 8x fewer tiles; measured 6.5x)."""
    q, k, v = (t.detach() for t in make(1, 2, 2, 8192, 8192, 64, dtype=torch.float32))
    with torch.no_grad():
        t = measure_times_interleaved({"full": lambda: seqkernels.flash_attention(q, k, v, causal=True),
                                       "window": lambda: seqkernels.flash_attention(q, k, v, causal=True,
                                                                                    window=(256, 0))},
                                      warmup=1, repeat=3)
    assert t["full"].median_s > 3 * t["window"].median_s, {n: x.median_ms for n, x in t.items()}
