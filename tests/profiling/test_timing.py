import time

import pytest

from seqkernels.profiling import attention_flops, measure_time, measure_times_interleaved


def test_median_of_repeats():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    t = measure_time(fn, warmup=2, repeat=5)
    assert len(calls) == 7 and len(t.times_s) == 5
    assert 0.0015 < t.median_s < 0.05


def test_interleaved_timing_takes_turns():
    calls = []

    def make(name, seconds):
        def fn():
            calls.append(name)
            time.sleep(seconds)
        return fn

    t = measure_times_interleaved({"a": make("a", 0.001), "b": make("b", 0.004)}, warmup=1, repeat=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-ups, then one run of each per turn
    assert len(t["a"].times_s) == 3 and t["a"].median_s < t["b"].median_s


def test_attention_flop_count():
    assert attention_flops(1, 1, 2, 3, 4) == 4 * 2 * 3 * 4
    assert attention_flops(1, 1, 2, 3, 4, causal=True) == 2 * 2 * 3 * 4
    assert attention_flops(1, 1, 2, 3, 4, backward=True) == pytest.approx(3.5 * 96)
