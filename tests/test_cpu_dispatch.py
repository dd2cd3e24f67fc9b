"""Runtime ISA dispatch of the CPU kernels (python/seqkernels/_cpu.py, csrc/cpu/module.cpp)."""

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

import seqkernels
from seqkernels import _C, _cpu

ALL_X86 = {f: True for f in ("x86", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl",
                             "avx512cd", "avx512bf16")}
BUILT = ["avx2", "avx512", "avx512_bf16"]


def test_supported_follows_features():
    assert _cpu.supported(ALL_X86) == BUILT
    assert _cpu.supported({**ALL_X86, "avx512bf16": False}) == ["avx2", "avx512"]
    assert _cpu.supported({**ALL_X86, "avx512vl": False, "avx512bf16": False}) == ["avx2"]
    assert _cpu.supported({**ALL_X86, "fma": False}) == []  # AVX-512 without FMA cannot happen; FMA is required
    assert _cpu.supported({"x86": True, "avx2": True}) == []  # no FMA/F16C: below the baseline
    assert _cpu.supported({"x86": False}) == ["default"]


def test_select_takes_the_best_built_and_supported():
    assert _cpu.select(None, BUILT, BUILT) == "avx512_bf16"
    assert _cpu.select("", ["avx2", "avx512"], BUILT) == "avx512"
    assert _cpu.select(None, BUILT, ["avx2", "avx512"]) == "avx512"
    assert _cpu.select(None, ["default"], ["default"]) == "default"
    for cap in BUILT:
        assert _cpu.select(cap, BUILT, BUILT) == cap


@pytest.mark.parametrize("requested, supported, built, match", [
    ("avx1024", BUILT, BUILT, r"SEQKERNELS_CPU_CAPABILITY='avx1024' is not a CPU capability: choose from avx2"),
    ("AVX2", BUILT, BUILT, "is not a CPU capability"),
    ("avx512_bf16", ["avx2", "avx512"], BUILT, r"'avx512_bf16': this CPU lacks it \(it runs: avx2, avx512\)"),
    ("avx2", [], BUILT, "this CPU lacks it"),
    ("avx512", BUILT, ["avx2"], "built without it"),
    (None, [], BUILT, "no CPU kernel module runs on this CPU"),
    (None, ["default"], BUILT, "no CPU kernel module runs on this CPU"),
])
def test_select_errors(requested, supported, built, match):
    with pytest.raises(RuntimeError, match=match):
        _cpu.select(requested, supported, built)


def _cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    pytest.skip("no /proc/cpuinfo flags")


def test_cpu_features_agree_with_proc_cpuinfo():
    """cpuid as _C reads it, against the kernel's own list (a second, independent source)."""
    feats = dict(_C.cpu_features())
    if not feats["x86"]:
        pytest.skip("not x86")
    flags = _cpuinfo_flags()
    for name, flag in [("avx2", "avx2"), ("fma", "fma"), ("f16c", "f16c"), ("avx512f", "avx512f"),
                       ("avx512bw", "avx512bw"), ("avx512dq", "avx512dq"), ("avx512vl", "avx512vl"),
                       ("avx512cd", "avx512cd"), ("avx512bf16", "avx512_bf16")]:
        assert feats[name] == (flag in flags), name


def test_the_running_capability_is_the_best_one():
    info = seqkernels.build_info()
    supported = _cpu.supported(dict(_C.cpu_features()))
    assert info["cpu_capabilities_supported"] == supported
    assert info["cpu_capabilities_built"] == _cpu.built()
    if os.environ.get(_cpu.ENV):
        assert info["cpu_capability"] == os.environ[_cpu.ENV]
    else:
        assert info["cpu_capability"] == [c for c in supported if c in _cpu.built()][-1]
    assert _cpu.kernels.capability == info["cpu_capability"] == _cpu.capability
    assert _cpu.kernels.avx512_bf16_compiled == (info["cpu_capability"] == "avx512_bf16")


def test_decode_regime_switch_reaches_the_loaded_module():
    assert _cpu.set_decode_regime(False) is True
    assert _cpu.kernels.set_decode_regime(True) is False  # the module's own flag was off
    assert _cpu.set_decode_regime(True) is True


SMOKE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wheel_smoke.py")


def _run_child(env_value: str | None, code: str | None = None) -> subprocess.CompletedProcess:
    """Runs `code` (default: tests/wheel_smoke.py) in a child Python with the variable set."""
    env = dict(os.environ)
    env.pop(_cpu.ENV, None)
    if env_value is not None:
        env[_cpu.ENV] = env_value
    argv = [sys.executable, SMOKE] if code is None else [sys.executable, "-c", code]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("cap", BUILT)
def test_each_path_this_cpu_runs_computes_right(cap):
    if cap not in _cpu.supported(dict(_C.cpu_features())) or cap not in _cpu.built():
        pytest.skip(f"this machine cannot run {cap}")
    r = _run_child(cap)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"capability {cap}\n" in r.stdout
    assert f"modules ['_cpu_{cap}']" in r.stdout, r.stdout  # exactly one kernel module loaded


def test_forcing_an_unknown_capability_fails_at_import():
    r = _run_child("avx9000", "import seqkernels")
    assert r.returncode != 0
    assert "SEQKERNELS_CPU_CAPABILITY='avx9000' is not a CPU capability" in r.stderr


def test_python_m_seqkernels_reports_the_forced_capability():
    r = _run_child("avx2", "import runpy; runpy.run_module('seqkernels', run_name='__main__')")
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"^cpu_capability\s+avx2$", r.stdout, re.MULTILINE), r.stdout


# AVX-512 in a disassembly: a zmm register, an upper xmm/ymm register (16-31, EVEX only) or an
# opmask register k0-k7.
AVX512_RE = re.compile(r"%zmm\d|%[xy]mm(1[6-9]|2\d|3[01])\b|%k[0-7]\b")
BF16_RE = re.compile(r"\b(vdpbf16ps|vcvtne2ps2bf16|vcvtneps2bf16)\b")


def _disassembly(pattern: str) -> str:
    if shutil.which("objdump") is None:
        pytest.skip("no objdump")
    pkg = os.path.dirname(seqkernels.__file__)
    paths = glob.glob(os.path.join(pkg, pattern))
    if not paths:
        pytest.skip(f"{pattern} not built")
    return subprocess.run(["objdump", "-d", "--no-show-raw-insn", paths[0]], capture_output=True, text=True,
                          check=True, timeout=120).stdout


def test_baseline_modules_hold_no_avx512():
    """_C must load on any CPU of its architecture and the avx2 module on any AVX2 CPU: an
    AVX-512 instruction in either (a stray -march=native, an intrinsic outside its #if) would
    be SIGILL there."""
    if not dict(_C.cpu_features())["x86"]:
        pytest.skip("not x86")
    for pattern in ("_C.*.so", "_cpu_avx2.*.so"):
        text = _disassembly(pattern)
        hits = [line for line in text.splitlines() if AVX512_RE.search(line)]
        assert not hits, f"{pattern}: AVX-512 instructions, e.g. {hits[:3]}"
    assert "%ymm" not in _disassembly("_C.*.so")  # not even AVX: the x86-64 baseline


def test_avx512_module_uses_avx512_and_no_bf16():
    if not dict(_C.cpu_features())["x86"]:
        pytest.skip("not x86")
    text = _disassembly("_cpu_avx512.*.so")
    assert "%zmm" in text
    assert not BF16_RE.search(text)
