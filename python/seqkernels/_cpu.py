"""Runtime ISA dispatch of the CPU kernels, as ATen does with its CPU capability.

The CPU kernels are compiled once per capability into modules ``seqkernels._cpu_<name>``
(setup.py); this module loads exactly one of them at import, after ``seqkernels._C``:

- ``avx2``: x86-64 with AVX2, FMA and F16C, the baseline;
- ``avx512``: plus AVX-512 F, BW, DQ, VL and CD;
- ``avx512_bf16``: plus AVX512-BF16;
- ``default``: the one module of a build on another architecture (no ISA flags).

The best capability that was built and that the CPU (and the OS) supports is chosen, from
cpuid (``seqkernels._C.cpu_features()``). ``SEQKERNELS_CPU_CAPABILITY=avx2|avx512|avx512_bf16``
forces one: an unknown name, one this CPU lacks or one that was not built raises
:class:`RuntimeError` when seqkernels is imported, before any kernel can run. The choice is
made once per process (the modules register the ops' CPU bodies with the dispatcher), so a
test of another path runs in a child process with the variable set.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

from . import _C

ENV = "SEQKERNELS_CPU_CAPABILITY"

# From the baseline up; each needs the features listed (names of _C.cpu_features()).
X86_CAPABILITIES: dict[str, tuple[str, ...]] = {
    "avx2": ("avx2", "fma", "f16c"),
    "avx512": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"),
    "avx512_bf16": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx512bf16"),
}
ALL_CAPABILITIES = (*X86_CAPABILITIES, "default")


def supported(features: dict[str, bool]) -> list[str]:
    """The capabilities a CPU with these features runs, from the baseline up."""
    if not features.get("x86", False):
        return ["default"]
    return [name for name, need in X86_CAPABILITIES.items() if all(features.get(f, False) for f in need)]


def built() -> list[str]:
    """The capabilities whose kernel module is installed, from the baseline up."""
    return [name for name in ALL_CAPABILITIES if importlib.util.find_spec(f"{__package__}._cpu_{name}") is not None]


def select(requested: str | None, supported_caps: list[str], built_caps: list[str]) -> str:
    """The capability to load: ``requested`` (a forced name, or None/"" for the best one).

    Raises RuntimeError naming the variable when a forced capability is unknown, not
    supported by this CPU or not built, or when no built module runs on this CPU.
    """
    if requested:
        if requested not in ALL_CAPABILITIES:
            raise RuntimeError(f"{ENV}={requested!r} is not a CPU capability: choose from "
                               f"{', '.join(X86_CAPABILITIES)} (or unset it to choose automatically)")
        if requested not in supported_caps:
            raise RuntimeError(f"{ENV}={requested!r}: this CPU lacks it (it runs: "
                               f"{', '.join(supported_caps) or 'none of ' + ', '.join(X86_CAPABILITIES)})")
        if requested not in built_caps:
            raise RuntimeError(f"{ENV}={requested!r}: seqkernels was built without it (built: "
                               f"{', '.join(built_caps) or 'none'}; see SEQKERNELS_CPU_CAPABILITIES in setup.py)")
        return requested
    usable = [c for c in supported_caps if c in built_caps]
    if not usable:
        raise RuntimeError(f"seqkernels: no CPU kernel module runs on this CPU (built: {', '.join(built_caps) or 'none'}; "
                           f"this CPU runs: {', '.join(supported_caps) or 'none'}; the x86-64 baseline is AVX2 with FMA)")
    return usable[-1]


def _load() -> tuple[str, ModuleType]:
    features = dict(_C.cpu_features())
    name = select(os.environ.get(ENV, "").strip() or None, supported(features), built())
    return name, importlib.import_module(f"{__package__}._cpu_{name}")


capability, kernels = _load()


def set_poison_outputs(on: bool) -> bool:
    """NaN-fill every kernel output before it is written (CPU and CUDA); returns the previous setting."""
    prev = _C.set_poison_outputs(on)
    kernels.set_poison_outputs(on)
    return prev


def set_decode_regime(on: bool) -> bool:
    """Let flash_attention take the CPU decode kernel (default on); returns the previous setting."""
    return kernels.set_decode_regime(on)
