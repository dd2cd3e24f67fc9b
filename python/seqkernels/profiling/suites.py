"""The sweeps behind ``seqkernels-bench``: speed and memory, as lists of row dicts.

Every op family registers a speed grid and a memory sweep here; the CLI formats them,
writes JSON/CSV and plots. Rows are plain dicts so they serialize as they are.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from .cases import build_case
from .memory import measure_peak_memory
from .timing import attention_flops, measure_times_interleaved


class Progress:
    """A one-line progress bar on stderr (only when the sweep has more than one step)."""

    def __init__(self, total: int, label: str, stream=sys.stderr):
        self.total, self.label, self.n, self.stream = total, label, 0, stream

    def step(self, what: str) -> None:
        self.n += 1
        width = 24
        done = int(width * self.n / max(self.total, 1))
        self.stream.write(f"\r{self.label} [{'#' * done}{'.' * (width - done)}] {self.n}/{self.total} {what[:48]:<48}")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


# --- speed -----------------------------------------------------------------------------------

@dataclass
class SpeedCase:
    op: str          # op family shown in the table
    shape: str       # human-readable shape
    params: dict     # passed to build_case
    impls: dict      # column name -> case name
    flops: float     # floating-point operations of one call
    mode: str        # "fwd" or "fwd+bwd"


def attention_speed_cases(device: str, quick: bool) -> list[SpeedCase]:
    if device.startswith("cuda"):
        return _attention_gpu_cases(quick)
    lens = [1024] if quick else [512, 1024, 2048, 4096]
    D = 64
    cases = []
    for L in lens:
        for causal in (False, True):
            for backward in (False, True):
                p = dict(B=1, H=8, L=L, D=D, causal=causal, backward=backward, dtype="float32")
                impls = {"seqkernels": "attention.seqkernels", "torch": "attention.sdpa"}
                if L <= 2048:
                    impls["reference"] = "attention.reference"
                cases.append(SpeedCase(
                    "attention" + (" causal" if causal else ""), f"B=1 H=8 L={L} D={D}", p, impls,
                    attention_flops(1, 8, L, L, D, causal, backward), "fwd+bwd" if backward else "fwd"))
    return cases


def padded_attention_speed_cases(device: str, quick: bool) -> list[SpeedCase]:
    """Issue 6's shape: B=4 H=8 L=2048 D=64 with half the keys padding; the same boolean
    mask for both, and seqkernels with key lengths as a third column."""
    B, H, D = 4, 8, 64
    cases = []
    for L in ([2048] if quick else [1024, 2048, 4096]):
        for backward in (False, True):
            p = dict(B=B, H=H, L=L, D=D, keep=0.5, backward=backward, dtype="float32")
            impls = {"seqkernels": "attention_padded.seqkernels", "torch": "attention_padded.sdpa",
                     "lengths": "attention_padded.seqkernels_lengths"}
            # useful work: the kept half of the keys
            cases.append(SpeedCase("padded attention", f"B={B} H={H} L={L} D={D} keep=0.5", p, impls,
                                   attention_flops(B, H, L, L // 2, D, False, backward),
                                   "fwd+bwd" if backward else "fwd"))
    return cases


def mha_speed_cases(device: str, quick: bool) -> list[SpeedCase]:
    """nn.MultiheadAttention self-attention with a key_padding_mask keeping half the keys."""
    B, E, heads = 4, 512, 8
    cases = []
    for L in ([1024] if quick else [1024, 2048]):
        for backward in (False, True):
            p = dict(B=B, L=L, E=E, heads=heads, keep=0.5, backward=backward, dtype="float32")
            flops = 2 * 4 * B * L * E * E * (3 if backward else 1) + attention_flops(
                B, heads, L, L // 2, E // heads, False, backward)
            cases.append(SpeedCase("mha", f"B={B} L={L} E={E} heads={heads} keep=0.5", p,
                                   {"seqkernels": "mha.seqkernels", "torch": "mha.torch"}, flops,
                                   "fwd+bwd" if backward else "fwd"))
    return cases


def _attention_gpu_cases(quick: bool) -> list[SpeedCase]:
    """Issue 4's GPU grid: bfloat16, 16k tokens per batch (B = 16384 / L), H * D = 2048,
    against torch's SDPA as it dispatches ("torch") and held to each backend."""
    cases = []
    for D in ([128] if quick else [64, 128]):
        for L in ([8192] if quick else [512, 2048, 8192, 16384]):
            B, H = max(1, 16384 // L), 2048 // D
            for causal in (False, True):
                for backward in (False, True):
                    p = dict(B=B, H=H, L=L, D=D, causal=causal, backward=backward, dtype="bfloat16")
                    impls = {"seqkernels": "attention.seqkernels", "torch": "attention.sdpa",
                             "sdpa_flash": "attention.sdpa_flash", "sdpa_efficient": "attention.sdpa_efficient",
                             "sdpa_cudnn": "attention.sdpa_cudnn"}
                    cases.append(SpeedCase(
                        "attention" + (" causal" if causal else ""), f"B={B} H={H} L={L} D={D}", p, impls,
                        attention_flops(B, H, L, L, D, causal, backward), "fwd+bwd" if backward else "fwd"))
    return cases


def _recurrent_speed_cases(family: str, quick: bool) -> list[SpeedCase]:
    from .cases import lstm_flops

    T, I, H = 100, 512, 512
    batches = [64] if quick else [64, 8, 1]
    cases = []
    for B in batches:
        for backward in (False, True):
            p = dict(T=T, B=B, I=I, H=H, backward=backward, dtype="float32")
            impls = {"seqkernels": f"{family}.seqkernels", "torch": f"{family}.torch",
                     "cell_loop": f"{family}.cell_loop"}
            if not quick:
                impls["reference"] = f"{family}.reference"
            flops = lstm_flops(T, B, I, H, backward, gates=4 if family == "lstm" else 1)
            cases.append(SpeedCase(family, f"T={T} B={B} I={I} H={H}", p, impls, flops,
                                   "fwd+bwd" if backward else "fwd"))
    return cases


def lstm_speed_cases(device: str, quick: bool) -> list[SpeedCase]:
    return _recurrent_speed_cases("lstm", quick)


def rnn_speed_cases(device: str, quick: bool) -> list[SpeedCase]:
    return _recurrent_speed_cases("rnn", quick)


SPEED_SUITES: dict[str, Callable[[str, bool], list[SpeedCase]]] = {
    "attention": attention_speed_cases,
    "padded_attention": padded_attention_speed_cases,
    "mha": mha_speed_cases,
    "lstm": lstm_speed_cases,
    "rnn": rnn_speed_cases,
}


def run_speed(ops: Iterable[str], device: str, quick: bool, repeat: int = 7) -> list[dict]:
    cases = [c for op in ops for c in SPEED_SUITES[op](device, quick)]
    rows, bar = [], Progress(len(cases), "speed")
    for c in cases:
        bar.step(f"{c.op} {c.mode} {c.shape}")
        row = dict(op=c.op, mode=c.mode, shape=c.shape, dtype=c.params.get("dtype", "float32"),
                   device=device, **{k: v for k, v in c.params.items()
                                     if k in ("L", "B", "T", "H", "D", "I", "E", "keep")})
        fns = {}
        for col, case in c.impls.items():
            row[f"{col}_ms"] = None  # stays None for a torch backend that does not take these inputs
            try:
                fn = build_case(case, c.params, device)
                fn()  # the first warm-up run: where a backend refuses the inputs
                fns[col] = fn
            except RuntimeError:
                if col in ("seqkernels", "torch"):
                    raise
        for col, t in measure_times_interleaved(fns, warmup=1, repeat=repeat, device=device).items():
            row[f"{col}_ms"] = t.median_ms
        del fns
        row["speedup_vs_torch"] = row["torch_ms"] / row["seqkernels_ms"]
        backends = [row[k] for k in row if k.startswith("sdpa_") and row[k] is not None]
        if backends:  # the best of torch's SDPA backends on these inputs
            row["best_sdpa_backend_ms"] = min(backends)
            row["speedup_vs_best_sdpa"] = min(backends) / row["seqkernels_ms"]
        if row.get("lengths_ms") is not None:
            row["speedup_lengths_vs_torch"] = row["torch_ms"] / row["lengths_ms"]
        if row.get("cell_loop_ms") is not None:
            row["speedup_vs_cell_loop"] = row["cell_loop_ms"] / row["seqkernels_ms"]
        row["seqkernels_gflops"] = c.flops / (row["seqkernels_ms"] * 1e-3) / 1e9
        row["torch_gflops"] = c.flops / (row["torch_ms"] * 1e-3) / 1e9
        rows.append(row)
    bar.close()
    return rows


# --- memory ----------------------------------------------------------------------------------

def fit_exponent(xs: list[float], ys: list[float]) -> Optional[float]:
    """Least-squares slope of log(y) against log(x): the exponent of y ~ x^p."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx > 0 else None


def available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        return free
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 << 30


def attention_theory(B: int, H: int, L: int, D: int, elem: int = 4) -> dict:
    """The three terms of attention's memory, in bytes."""
    return dict(inputs_bytes=3 * B * H * L * D * elem, scores_bytes=B * H * L * L * elem,
                output_bytes=B * H * L * D * elem)


def _sweep(case_prefix: str, impls, seq_lens, device, modes, params_for, theory_for, fit_from, bar, budget, log):
    rows, fits = [], {}
    for backward in modes:
        mode = "fwd+bwd" if backward else "fwd"
        for impl in impls:
            xs, ys, stopped = [], [], None
            for L in seq_lens:
                bar.step(f"{case_prefix}.{impl} {mode} n={L}")
                if stopped:
                    continue
                if ys:
                    p = fit_exponent(xs, ys) if len(ys) >= 2 else 2.0
                    predicted = ys[-1] * (L / xs[-1]) ** max(p or 2.0, 1.0)
                    if predicted > budget:
                        stopped = (f"{case_prefix}.{impl} {mode}: stopped before n={L}: predicted peak "
                                   f"{predicted / 2**30:.1f} GiB exceeds half of the available "
                                   f"{2 * budget / 2**30:.1f} GiB")
                        continue
                params = dict(params_for(L), backward=backward)
                r = measure_peak_memory(f"{case_prefix}.{impl}", params, device)
                if not r.ok:
                    stopped = f"{case_prefix}.{impl} {mode}: stopped at n={L}: {r.error}"
                    continue
                xs.append(L)
                ys.append(r.peak_bytes)
                rows.append(dict(op=case_prefix, impl=impl, mode=mode, L=L, device=device, peak_bytes=r.peak_bytes,
                                 **{k: v for k, v in params.items() if k not in ("backward", "L")}, **theory_for(params)))
            sel = [(x, y) for x, y in zip(xs, ys) if x >= fit_from] if impl != "reference" else list(zip(xs, ys))
            fits[f"{case_prefix} {impl} {mode}"] = fit_exponent([x for x, _ in sel], [y for _, y in sel])
            if stopped:
                bar.stream.write("\n")
                log(stopped)
    return rows, fits


def run_memory(seq_lens: list[int], device: str, backward_modes=(False, True),
               impls=("reference", "sdpa", "seqkernels"), B: int = 1, H: int = 8, D: int = 64,
               fit_from: int = 1024, lstm_lens: list[int] | None = None, log=print) -> tuple[list[dict], dict]:
    """Peak memory against sequence length; returns (rows, fitted exponents).

    Attention (B, H, D fixed; the reference, torch SDPA and seqkernels) over ``seq_lens``,
    forward and forward+backward; the LSTM for training (forward+backward; T = n, B=16,
    I=H=256; seqkernels and torch.nn.LSTM) over ``lstm_lens`` (default: the lengths up to
    4096). A sweep stops before a point whose predicted peak (extrapolated from the points
    so far with their fitted exponent) exceeds half of the available memory, and says so.
    """
    lstm_lens = [n for n in seq_lens if n <= 4096] if lstm_lens is None else lstm_lens
    total = len(seq_lens) * len(impls) * len(backward_modes) + 2 * len(lstm_lens)
    bar = Progress(total, "memory")
    budget = available_bytes(device) // 2
    rows, fits = _sweep("attention", impls, seq_lens, device, backward_modes,
                        lambda n: dict(B=B, H=H, L=n, D=D),
                        lambda p: attention_theory(p["B"], p["H"], p["L"], p["D"]), fit_from, bar, budget, log)
    if lstm_lens:
        r2, f2 = _sweep("lstm", ("torch", "seqkernels"), lstm_lens, device, (True,),
                        lambda n: dict(T=n, B=16, I=256, H=256), lambda p: {}, min(lstm_lens[-1], 512), bar, budget, log)
        rows += r2
        fits.update(f2)
    bar.close()
    return rows, fits
