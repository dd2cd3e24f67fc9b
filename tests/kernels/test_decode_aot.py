"""Ahead-of-time compilation of the flash-decoding kernels for sm_80 and sm_90 in every
config of decode.CONFIGS (contiguous and paged, float16): shared memory fits, no spills."""

import functools
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from seqkernels.kernels import decode  # noqa: E402


@functools.lru_cache(maxsize=1)
def _report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "seqkernels.kernels.aot", "--decode", "--json"], capture_output=True,
                         text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_decode_config_compiles_fits_and_does_not_spill():
    rows = _report()
    assert len(rows) == len(decode.aot_cases())
    bad = [r for r in rows if r["shared"] > r["smem_limit"] or r["stack"] or r["local"]]
    assert not bad, bad
    assert {r["arch"] for r in rows} == {80, 90} and {r["paged"] for r in rows} == {False, True}
