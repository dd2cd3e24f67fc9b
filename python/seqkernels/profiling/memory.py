"""Peak memory of one call, on the GPU and on the CPU.

GPU: ``torch.cuda.reset_peak_memory_stats`` then ``torch.cuda.max_memory_allocated`` around
the call, minus what was allocated before it.

CPU: torch has no peak counter for CPU tensors, and allocations made inside a kernel
(C++ scratch buffers) are invisible to torch anyway, so the method measures the process:

1. Each point runs in a **fresh Python subprocess**, so nothing cached by an earlier point
   (allocator free lists, other sizes' buffers) is counted or hidden.
2. glibc's malloc is pinned to a fixed mmap threshold (``MALLOC_MMAP_THRESHOLD_=65536``):
   every block above 64 KiB is its own mmap, returned to the OS when freed. Without the
   pin, glibc raises the threshold after the first free and later large blocks come
   from the heap, where freed memory is reused silently.
3. The subprocess builds the inputs, runs the function once (warm-up: libraries, thread
   pools and lazily-allocated caches), then reads its resident size (VmRSS), resets the
   kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs`` resets VmHWM), runs the
   function again and reads the peak (VmHWM). The result is peak - baseline: every byte
   the call touched beyond what existed before it, including its outputs.

Linux only. Resolution is a page (4 KiB); the test suite checks it against a known
allocation and against the reference attention's n x n score matrix (within 10%).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import torch

_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


@dataclass
class MemoryResult:
    peak_bytes: int  # peak extra bytes during the call (beyond what was live before it)
    ok: bool = True
    error: Optional[str] = None


def _read_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_of(fn) -> int:
    """In the current process: peak RSS growth of ``fn()`` (call it from a fresh process)."""
    fn()  # warm-up
    base = _read_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return max(0, _read_status("VmHWM") - base)


def cuda_peak_of(fn) -> int:
    torch.cuda.synchronize()
    fn()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return max(0, torch.cuda.max_memory_allocated() - before)


def measure_peak_memory(case: str, params: dict, device: str = "cpu", timeout_s: float = 300) -> MemoryResult:
    """Peak extra memory of the benchmark case ``case`` (see :mod:`.cases`) with ``params``.

    CPU: runs in a fresh subprocess as described above. CUDA: in this process.
    Returns ``ok=False`` with the error text when the case does not fit or fails.
    """
    if device.startswith("cuda"):
        from .cases import build_case

        try:
            fn = build_case(case, params, device)
            peak = cuda_peak_of(fn)
            del fn
            torch.cuda.empty_cache()
            return MemoryResult(peak)
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            return MemoryResult(0, ok=False, error=f"out of memory: {str(e).splitlines()[0]}")
    env = dict(os.environ, **_CHILD_ENV)
    cmd = [sys.executable, "-m", "seqkernels.profiling._memory_child", case, json.dumps(params)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return MemoryResult(0, ok=False, error=f"timed out after {timeout_s:.0f} s")
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1]
        return MemoryResult(0, ok=False, error=tail)
    return MemoryResult(int(json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]))
