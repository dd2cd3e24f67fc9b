"""The CPU peak-memory method against theoretical byte counts (each point is a subprocess)."""

import sys

import pytest

from seqkernels.profiling import measure_peak_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")


@pytest.mark.parametrize("nbytes", [64 << 20, 200 << 20])
def test_known_allocation_within_10_percent(nbytes):
    r = measure_peak_memory("alloc", {"bytes": nbytes})
    assert r.ok, r.error
    assert abs(r.peak_bytes - nbytes) <= 0.1 * nbytes, (r.peak_bytes, nbytes)


def test_reference_score_matrix_within_10_percent():
    """q @ k^T for B=1, H=4, L=2048: the n x n matrix is 64 MiB, the inputs are already live."""
    p = dict(B=1, H=4, L=2048, D=64)
    theory = 4 * 2048 * 2048 * 4
    r = measure_peak_memory("attention.scores", p)
    assert r.ok, r.error
    assert abs(r.peak_bytes - theory) <= 0.1 * theory, (r.peak_bytes, theory)


def test_flash_attention_memory_is_linear_and_reference_quadratic():
    small, big = dict(B=1, H=4, L=1024, D=64), dict(B=1, H=4, L=4096, D=64)
    flash = [measure_peak_memory("attention.seqkernels", p).peak_bytes for p in (small, big)]
    refm = [measure_peak_memory("attention.reference", p).peak_bytes for p in (small, big)]
    out_bytes = 4 * 4096 * 64 * 4
    assert flash[1] < 2 * out_bytes  # output + LSE + a few tiles, nothing n x n
    assert flash[1] / flash[0] < 4 * 1.25  # 4x the length: about 4x the memory
    assert refm[1] / refm[0] > 14  # about 16x


def test_failure_is_reported_not_raised():
    r = measure_peak_memory("no-such-case", {})
    assert not r.ok and "no-such-case" in r.error


def test_lstm_inference_keeps_no_workspace():
    """Under no_grad the LSTM keeps neither gates (T*B*4H) nor cell states: the peak stays
    within a few outputs' worth (the gates alone would be 4 outputs)."""
    p = dict(T=100, B=64, I=512, H=512, backward=False)
    y_bytes = 100 * 64 * 512 * 4
    r = measure_peak_memory("lstm.seqkernels", p)
    assert r.ok, r.error
    assert r.peak_bytes < 3 * y_bytes, (r.peak_bytes, y_bytes)
