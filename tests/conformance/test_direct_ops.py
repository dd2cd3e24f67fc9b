"""Item 7: every C++ op checks every tensor argument before a kernel runs. Each case passes
one wrong argument and expects a RuntimeError that names the op or the argument; the
cases run in a child process, so a crash fails them instead of killing the run."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from . import direct_op_cases

ROOT = pathlib.Path(__file__).resolve().parents[2]
_results: dict = {}


def _run(op: str) -> dict:
    if op not in _results:
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        p = subprocess.run([sys.executable, "-m", "tests.conformance.direct_op_cases", op], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            _results[op] = RuntimeError(f"the child process exited with {p.returncode}:\n{p.stderr[-2000:]}")
        else:
            _results[op] = json.loads(p.stdout.strip().splitlines()[-1])
    return _results[op]


def _cases():
    # the case names, without building the tensors here (the child builds them)
    names = {
        "flash_attention_forward": ["q 3-D", "k batch", "k heads", "v length", "k head dim", "head dim 0",
                                    "v head dim 0", "dtype", "int dtype", "mask shape", "mask 2-D", "mask dtype",
                                    "key_lengths shape", "key_lengths dtype", "key_lengths negative",
                                    "key_lengths past Lk", "dropout without rng_state", "rng_state shape",
                                    "dropout_p 1"],
        "flash_attention_backward": ["grad_out batch", "grad_out heads", "grad_out length", "grad_out dtype",
                                     "out batch", "out heads", "lse batch", "lse heads", "lse length", "lse int",
                                     "grad_lse (Lq,)", "grad_lse heads", "key_lengths past Lk",
                                     "q heads not a multiple"],
        "lstm_layer_forward": ["x 2-D", "h0 batch", "c0 batch", "c0 hidden", "w_ih columns", "w_hh rows",
                               "bias size", "bias dtype", "w_hr shape", "no w_hr with P != H", "lengths 2^62",
                               "lengths 0", "lengths shape", "lengths dtype", "batch 0"],
        "lstm_layer_backward": ["grad_y steps", "grad_h_n batch", "grad_c_n hidden", "gates steps", "gates width",
                                "y steps", "cs steps", "hs steps with lengths", "rs with w_hr", "gates dtype"],
        "rnn_layer": ["forward h0 hidden", "forward w_hh not square", "forward bias size", "forward lengths past T",
                      "backward grad_y steps", "backward grad_h_n batch", "backward y steps",
                      "backward hs steps with lengths"],
    }
    assert set(names) == set(direct_op_cases.CASES)
    return [(op, n) for op, ns in names.items() for n in ns]


@pytest.mark.parametrize("op,case", _cases())
def test_wrong_argument_raises(op, case):
    results = _run(op)
    if isinstance(results, Exception):
        raise results
    assert case in results, f"no case {case!r} in {sorted(results)}"
    got = results[case]
    assert got is not None, f"{op} with {case}: returned instead of raising"
    exc, msg = got
    assert exc in ("RuntimeError", "ValueError"), f"{op} with {case}: {exc}: {msg}"
    words = ["flash_attention", "recurrent layer", "lstm", "rnn", "must"]
    assert any(w in msg for w in words), f"{op} with {case}: unclear message {msg!r}"
