"""Build seqkernels._C and the CPU kernel modules from csrc/.

seqkernels._C holds the op schemas, the build facts and the CUDA bodies; it is compiled for
the baseline of the architecture (no -march), so it loads on any CPU. The CPU kernels
(csrc/attention/*.cpp, csrc/rnn/*.cpp, csrc/cpu/*.cpp) are compiled once per CPU capability,
each into its own module seqkernels._cpu_<capability> with that capability's ISA flags
(on x86-64: avx2, avx512, avx512_bf16; elsewhere one "default" module without flags); at
import, seqkernels loads the best one the CPU runs (python/seqkernels/_cpu.py). No
-march=native: a wheel built here runs on any x86-64 CPU with AVX2 and FMA.

The C++ sources are always compiled (-O3, OpenMP so that ``at::parallel_for`` runs in
parallel). The CUDA sources (``csrc/**/*.cu``) are compiled too whenever torch is a CUDA
build and ``nvcc`` can be found, *whether or not a GPU is visible*, so that a CUDA compile
error fails the build on CPU-only machines as well.

Environment:
  SEQKERNELS_CUDA=0        never compile the CUDA sources
  SEQKERNELS_CUDA=1        compile them, and make a missing toolkit an error
  TORCH_CUDA_ARCH_LIST     CUDA architectures (default "8.0;9.0": sm_80 and sm_90)
  SEQKERNELS_CPU_CAPABILITIES  comma-separated CPU capabilities to build (default: all of
                           the architecture's; e.g. "avx512_bf16" for a quicker build that
                           runs only on such CPUs)
  MAX_JOBS                 parallel compile jobs (ninja)
"""

from __future__ import annotations

import glob
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"[seqkernels setup] {msg}", file=sys.stderr)


def _cuda_root_from_nvcc(nvcc: str) -> str | None:
    """The real toolkit root behind ``nvcc``.

    ``nvcc`` on PATH may be a wrapper script (``exec /usr/local/cuda-13.0/bin/nvcc``), so the
    parent of its folder is not necessarily the toolkit. ``nvcc --dryrun`` prints the
    folder of the real binary as ``#$ _HERE_=...``.
    """
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ _HERE_=(.*)$", out.stdout + out.stderr, re.MULTILINE)
    if not m:
        return None
    return os.path.realpath(os.path.join(m.group(1).strip(), ".."))


def _is_toolkit(root: str | None) -> bool:
    return bool(root) and any(
        os.path.exists(os.path.join(root, d, "libcudart.so"))
        for d in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")
    ) and os.path.exists(os.path.join(root, "bin", "nvcc"))


def _find_cuda_home() -> str | None:
    """CUDA_HOME if it is a real toolkit, else the root behind the nvcc on PATH."""
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if _is_toolkit(cand):
            return os.path.realpath(cand)
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = _cuda_root_from_nvcc(nvcc)
        if _is_toolkit(root):
            return root
        root = os.path.realpath(os.path.join(os.path.dirname(os.path.realpath(nvcc)), ".."))
        if _is_toolkit(root):
            return root
    if _is_toolkit("/usr/local/cuda"):
        return os.path.realpath("/usr/local/cuda")
    return None


def _decide_cuda() -> str | None:
    """Returns the CUDA root to build with, or None for a CPU-only build."""
    mode = os.environ.get("SEQKERNELS_CUDA", "").strip()
    if mode == "0":
        _log("SEQKERNELS_CUDA=0: CUDA sources not compiled")
        return None
    import torch

    reasons = []
    if torch.version.cuda is None:
        reasons.append("torch is not a CUDA build")
    home = _find_cuda_home()
    if home is None:
        reasons.append("no CUDA toolkit (nvcc with libcudart) found; set CUDA_HOME")
    if reasons:
        if mode == "1":
            raise RuntimeError("SEQKERNELS_CUDA=1 but " + "; ".join(reasons))
        _log("CUDA sources not compiled: " + "; ".join(reasons))
        return None
    return home


def _nvidia_pip_includes() -> list[str]:
    """include/ folders of the NVIDIA pip packages torch depends on.

    torch's CUDA headers include cusparse.h, cublas_v2.h, ... which a bare toolkit may
    lack; the pip packages (site-packages/nvidia/...) ship them.
    """
    site = sysconfig.get_paths()["purelib"]
    dirs = sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


# The CPU capabilities of x86-64 and the ISA flags of their kernel modules, from the baseline
# up (python/seqkernels/_cpu.py knows the same names and the cpuid features each needs).
# -mprefer-vector-width=512: the loops GCC vectorizes itself use zmm registers too (its
# generic tuning prefers 256-bit vectors); the intrinsics code is the same either way.
_X86_AVX2 = ["-mavx2", "-mfma", "-mf16c"]
_X86_AVX512 = _X86_AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512cd",
                           "-mprefer-vector-width=512"]
X86_CAPABILITIES = {
    "avx2": _X86_AVX2,
    "avx512": _X86_AVX512,
    "avx512_bf16": _X86_AVX512 + ["-mavx512bf16"],
}


def _cpu_capabilities() -> dict[str, list[str]]:
    """The CPU kernel modules to build: capability name -> ISA flags."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    all_caps = X86_CAPABILITIES if x86 else {"default": []}
    wanted = os.environ.get("SEQKERNELS_CPU_CAPABILITIES", "").strip()
    if not wanted:
        return dict(all_caps)
    names = [n.strip() for n in wanted.split(",") if n.strip()]
    unknown = [n for n in names if n not in all_caps]
    if unknown or not names:
        raise RuntimeError(f"SEQKERNELS_CPU_CAPABILITIES={wanted!r}: choose from {', '.join(all_caps)}")
    return {n: all_caps[n] for n in all_caps if n in names}


def _cpu_kernel_sources(capability: str) -> list[str]:
    """One wrapper source per CPU kernel source, in build/cpu_src/<capability>/: the same file
    compiled for each capability needs a path of its own (objects are named after sources).
    A wrapper is rewritten only when its text changes, so ninja does not rebuild it."""
    sources = sorted(glob.glob("csrc/attention/*.cpp") + glob.glob("csrc/rnn/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    out = []
    for src in sources:
        rel = os.path.relpath(src, "csrc")
        wrapper = os.path.join("build", "cpu_src", capability, rel.replace(os.sep, "__"))
        text = f'// generated by setup.py: {src} for the {capability} module\n#include "{rel}"\n'
        os.makedirs(os.path.dirname(wrapper), exist_ok=True)
        old = open(wrapper).read() if os.path.exists(wrapper) else None
        if old != text:
            with open(wrapper, "w") as f:
                f.write(text)
        out.append(wrapper)
    return out


def _extensions():
    cuda_home = _decide_cuda()
    if cuda_home is not None:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    core = sorted(glob.glob("csrc/*.cpp"))  # schemas and build facts: seqkernels._C
    cu = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    # -g0: no debug info (Python's own flags ask for -g; it costs ~40% of the compile time,
    # and the C++ is compiled three times, once per CPU capability).
    cxx = ["-O3", "-g0", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = []
    build_cuda = cuda_home is not None and bool(cu)
    if cuda_home is not None and not cu:
        _log("CUDA toolkit found but csrc/ holds no .cu file yet")
    if build_cuda:
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        _log(f"compiling CUDA sources with {cuda_home} for TORCH_CUDA_ARCH_LIST={archs}")
        define_macros += [
            ("SEQKERNELS_WITH_CUDA", "1"),
            ("SEQKERNELS_CUDA_ARCHS", '"' + archs + '"'),
        ]
        ext = CUDAExtension(
            "seqkernels._C",
            core + cu,
            include_dirs=include_dirs + _nvidia_pip_includes(),
            define_macros=define_macros,
            extra_compile_args={
                "cxx": cxx,
                "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
            },
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "seqkernels._C",
            core,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    exts = [ext]
    caps = _cpu_capabilities()
    _log("CPU kernel modules: " + ", ".join(f"{n} ({' '.join(f) or 'no ISA flags'})" for n, f in caps.items()))
    for name, flags in caps.items():
        exts.append(
            CppExtension(
                f"seqkernels._cpu_{name}",
                _cpu_kernel_sources(name),
                include_dirs=include_dirs,
                define_macros=[("SEQKERNELS_CAPABILITY", f'"{name}"')],
                extra_compile_args={"cxx": cxx + flags},
                extra_link_args=["-fopenmp"],
            )
        )
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


def _packages() -> list[str]:
    """seqkernels and every subpackage under python/seqkernels, plus kernels/ as seqkernels.kernels."""
    pkgs = ["seqkernels.kernels"]
    for dirpath, _, files in os.walk(os.path.join(ROOT, "python", "seqkernels")):
        if "__init__.py" in files:
            rel = os.path.relpath(dirpath, os.path.join(ROOT, "python"))
            pkgs.append(rel.replace(os.sep, "."))
    return sorted(pkgs)


ext_modules, cmdclass = _extensions()

setup(
    package_dir={"seqkernels": "python/seqkernels", "seqkernels.kernels": "kernels"},
    packages=_packages(),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
