import time

import pytest

from seqkernels.profiling import attention_flops, measure_time


def test_median_of_repeats():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    t = measure_time(fn, warmup=2, repeat=5)
    assert len(calls) == 7 and len(t.times_s) == 5
    assert 0.0015 < t.median_s < 0.05


def test_attention_flop_count():
    assert attention_flops(1, 1, 2, 3, 4) == 4 * 2 * 3 * 4
    assert attention_flops(1, 1, 2, 3, 4, causal=True) == 2 * 2 * 3 * 4
    assert attention_flops(1, 1, 2, 3, 4, backward=True) == pytest.approx(3.5 * 96)
