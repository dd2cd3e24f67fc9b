"""LSTM: seqkernels.lstm against torch.nn.LSTM (oneDNN / cuDNN), torch.nn.LSTMCell stepped in a
Python loop, and the reference. T=100, I=H=512, float32. Groups: "lstm-{device}-{mode}-B{B}"."""

import pytest

from benchlib import run_case

IMPLS = ["seqkernels", "torch", "cell_loop", "reference"]


def _run(benchmark, device, impl, B, backward, rounds):
    run_case(benchmark, f"lstm.{impl}", dict(T=100, B=B, I=512, H=512, backward=backward), device,
             f"lstm-{device}-{'fwdbwd' if backward else 'fwd'}-B{B}", rounds)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwdbwd"])
@pytest.mark.parametrize("B", [64, 1])
def test_lstm_cpu(benchmark, impl, backward, B):
    if impl == "reference" and B == 64 and backward:
        pytest.skip("slow and says nothing new")
    _run(benchmark, "cpu", impl, B, backward, rounds=3)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwdbwd"])
@pytest.mark.parametrize("B", [64, 8, 4, 2, 1])
def test_lstm_gpu(benchmark, impl, backward, B):
    _run(benchmark, "cuda", impl, B, backward, rounds=10)
