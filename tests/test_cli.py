"""seqkernels-bench: its errors, the fit of the exponent, and the JSON/CSV schema."""

import csv
import json
import math

import pytest

from seqkernels import cli
from seqkernels.profiling.suites import fit_exponent


def test_fit_exponent_on_synthetic_data():
    xs = [256, 512, 1024, 2048, 4096]
    assert fit_exponent(xs, [3.0 * x**2 for x in xs]) == pytest.approx(2.0)
    assert fit_exponent(xs, [7.0 * x + 0 for x in xs]) == pytest.approx(1.0)
    noisy = [x**1.5 * (1.05 if i % 2 else 0.95) for i, x in enumerate(xs)]
    assert abs(fit_exponent(xs, noisy) - 1.5) < 0.05
    assert fit_exponent([10], [5]) is None
    assert fit_exponent([1, 1], [2, 3]) is None  # no spread in x


@pytest.mark.parametrize("argv,match", [
    (["speed", "--ops", "gru"], "unknown op 'gru'"),
    (["speed", "--device", "tpu"], "--device must be 'cpu' or 'cuda'"),
    (["memory", "--seq-lens", "256,abc"], "comma-separated integers"),
    (["memory", "--seq-lens", "0,256"], "positive integers"),
])
def test_cli_errors_are_messages_not_tracebacks(argv, match, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "seqkernels-bench: error:" in err and match in err and "Traceback" not in err


def test_cli_cuda_without_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert cli.main(["speed", "--device", "cuda"]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err


def test_speed_writes_json_and_csv(tmp_path, monkeypatch, capsys):
    from seqkernels.profiling import suites

    def tiny(device, quick):
        p = dict(B=1, H=2, L=64, D=16, causal=False, backward=False, dtype="float32")
        return [suites.SpeedCase("attention", "B=1 H=2 L=64 D=16", p,
                                 {"seqkernels": "attention.seqkernels", "torch": "attention.sdpa"},
                                 suites.attention_flops(1, 2, 64, 64, 16), "fwd")]

    monkeypatch.setitem(suites.SPEED_SUITES, "attention", tiny)
    assert cli.main(["speed", "--ops", "attention", "--repeat", "2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "speed_cpu_attention.json").read_text())
    assert set(data["meta"]) >= {"date", "device", "machine", "torch", "seqkernels"}
    row = data["rows"][0]
    for key in ("op", "mode", "shape", "dtype", "device", "seqkernels_ms", "torch_ms", "speedup_vs_torch",
                "seqkernels_gflops"):
        assert key in row
    assert math.isclose(row["speedup_vs_torch"], row["torch_ms"] / row["seqkernels_ms"])
    with open(tmp_path / "speed_cpu_attention.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and float(rows[0]["seqkernels_ms"]) == pytest.approx(row["seqkernels_ms"])
    assert "vs torch" in capsys.readouterr().out


def test_memory_writes_table_json_csv_and_plot(tmp_path, capsys):
    assert cli.main(["memory", "--seq-lens", "128,256", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "memory_cpu.json").read_text())
    impls = {(r["op"], r["impl"], r["mode"]) for r in data["rows"]}
    assert ("attention", "reference", "fwd") in impls and ("attention", "seqkernels", "fwd+bwd") in impls
    assert ("lstm", "seqkernels", "fwd+bwd") in impls
    att = [r for r in data["rows"] if r["op"] == "attention"]
    for key in ("L", "peak_bytes", "inputs_bytes", "scores_bytes", "output_bytes"):
        assert all(key in r for r in att)
    assert "attention reference fwd" in data["fitted_exponents"]
    assert (tmp_path / "memory_cpu.png").stat().st_size > 10_000
    assert "fitted exponent" in capsys.readouterr().out


def test_speed_transformers_quick_writes_rows(tmp_path, capsys):
    pytest.importorskip("transformers")
    assert cli.main(["speed", "--ops", "transformers", "--quick", "--repeat", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "speed_cpu_transformers.json").read_text())
    assert data["meta"]["transformers"] and data["meta"]["matmul_GFLOPs_float32"] > 0
    assert {r["kind"] for r in data["rows"]} == {"prefill", "train", "decode"}
    for r in data["rows"]:
        for impl in ("seqkernels", "sdpa", "eager"):
            assert r[f"{impl}_ms"] > 0 and r[f"{impl}_tokens_per_s"] > 0
        assert math.isclose(r["speedup_vs_sdpa"], r["sdpa_ms"] / r["seqkernels_ms"])
        share = r.get("share_of_matmul_roof", r.get("share_of_read_bw"))
        assert 0 < share < 2
    assert "vs sdpa" in capsys.readouterr().out
