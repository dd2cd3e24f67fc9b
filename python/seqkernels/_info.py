"""Build and runtime facts: what was compiled, for which architectures, and what is usable now."""

from __future__ import annotations

import importlib
import os

import torch

from . import _C, _cpu


def _triton_version() -> str | None:
    try:
        return importlib.import_module("triton").__version__
    except Exception:  # Triton is optional on the CPU
        return None


def build_info() -> dict:
    """The build facts of this installation, as a dict.

    Keys: ``seqkernels``, ``torch`` (runtime) and ``torch_compiled`` (the torch the
    extension was built against), ``triton`` (None when not installed), ``cuda``
    (torch's CUDA version, None for a CPU build), ``cuda_compiled`` (whether the CUDA
    sources were compiled into ``seqkernels._C``), ``cuda_archs``, ``gpu_visible``,
    ``gpu_name``, ``triton_interpret`` (``TRITON_INTERPRET=1``), ``cpu_threads``,
    ``cpu_capability`` (the ISA build of the CPU kernels running: avx2, avx512 or
    avx512_bf16; ``default`` off x86), ``cpu_capabilities_built``, ``cpu_capabilities_supported``
    (by this CPU), ``openmp`` and ``parallel_backend``.
    """
    from . import __version__

    native = dict(_C.build_info())
    gpu = torch.cuda.is_available()
    return {
        "seqkernels": __version__,
        "torch": torch.__version__,
        "torch_compiled": native["torch_version_compiled"],
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "cuda_compiled": native["cuda_compiled"],
        "cuda_archs": native["cuda_archs"],
        "gpu_visible": gpu,
        "gpu_name": torch.cuda.get_device_name() if gpu else None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "cpu_threads": torch.get_num_threads(),
        "cpu_capability": _cpu.capability,
        "cpu_capabilities_built": _cpu.built(),
        "cpu_capabilities_supported": _cpu.supported(dict(_C.cpu_features())),
        "openmp": native["openmp"],
        "parallel_backend": native["parallel_backend"].splitlines()[-1].strip()
        if native["parallel_backend"]
        else "",
    }


def format_build_info(info: dict | None = None) -> str:
    info = build_info() if info is None else info
    width = max(len(k) for k in info)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in info.items())
