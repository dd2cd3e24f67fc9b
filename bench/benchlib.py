"""Helpers shared by the pytest-benchmark suites in bench/."""

import torch


def run_case(benchmark, case: str, params: dict, device: str, group: str, rounds: int) -> None:
    """Benchmark one seqkernels.profiling case (synchronizing the GPU after every call)."""
    from seqkernels.profiling.cases import build_case

    fn = build_case(case, params, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def call():
        fn()
        sync()

    benchmark.group = group
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=1)
