"""The decode profiling runs (python -m seqkernels.profiling.decode) on tiny shapes: every
column they write is there and the ratios are those of the medians."""

from __future__ import annotations

import json

import pytest

from seqkernels.profiling import decode


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(decode, "ISSUE_SHAPES", [(1, 4, 2, 1, 37, 16, False), (1, 2, 2, 3, 20, 8, True)])
    real_case = decode.decode_case
    monkeypatch.setattr(decode, "decode_case", lambda p, device="cpu": real_case({**p, "Lk": min(p["Lk"], 40),
                                                                                     "D": 16}, device))
    monkeypatch.setattr(decode, "read_bandwidth", lambda nbytes, device="cpu", repeat=7: 1e9)


def test_issue_shapes_rows(tiny):
    rows = decode.run_issue_shapes(repeat=2)
    assert [(r["Lq"], r["causal"]) for r in rows] == [(1, False), (3, True)]
    for r in rows:
        assert r["speedup_vs_torch"] == pytest.approx(r["torch_ms"] / r["seqkernels_ms"])
        assert r["speedup_vs_general"] == pytest.approx(r["general_ms"] / r["seqkernels_ms"])
        assert r["kv_GBps"] > 0


def test_main_writes_both_files(tiny, tmp_path):
    decode.main(["--out", str(tmp_path)])
    shapes = json.loads((tmp_path / "decode_issue_shapes_cpu.json").read_text())
    both = json.loads((tmp_path / "decode_bf16_vs_f32_cpu.json").read_text())
    assert len(shapes["rows"]) == 2 and len(both["rows"]) == 6
    assert {"machine", "date", "read_GBps_1GiB"} <= set(both["meta"])
    for r in both["rows"]:
        assert r["bf16_speedup"] == pytest.approx(r["float32_ms"] / r["bfloat16_ms"])


def test_suffix_names_the_files(tiny, tmp_path):
    decode.main(["--out", str(tmp_path), "--suffix", "_avx2"])
    assert sorted(f.name for f in tmp_path.iterdir()) == ["decode_bf16_vs_f32_cpu_avx2.json",
                                                          "decode_issue_shapes_cpu_avx2.json"]
