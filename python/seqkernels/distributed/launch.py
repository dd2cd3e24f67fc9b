"""Run a function on P local processes of one process group, bounded in time: how the
tests and the benchmarks run ring attention on one machine, and a quick way to try it.

``run_ranks(fn, P, *args)`` spawns P processes (torch.multiprocessing's spawn context;
``threads`` torch threads each), initializes a gloo group over 127.0.0.1 (or NCCL, one GPU
per rank) in each and calls ``fn(rank, P, *args)``, which must be importable (a module-level
function); it returns the results by rank, or raises with the failing rank's traceback.
Every process is joined or killed before it returns, whatever happened: nothing is left
behind.

    >>> from seqkernels.distributed.launch import run_ranks
    >>> run_ranks(my_module.work, 2)
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from datetime import timedelta

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, P, port, results, args, threads, backend):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=P, timeout=timedelta(seconds=60))
        try:
            results.put((rank, True, fn(rank, P, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_ranks(fn, P: int, *args, timeout: float = 180.0, threads: int = 1, backend: str = "gloo") -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, P, port, results, args, threads, backend), daemon=True)
             for r in range(P)]
    for p in procs:
        p.start()
    got, deadline = {}, time.monotonic() + timeout
    try:
        while len(got) < P:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{P} ranks did not finish within {timeout:.0f} s; got ranks {sorted(got)}")
            try:
                rank, ok, payload = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a rank died with exit code {dead[0]} before reporting")
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            got[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=10)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [got[r] for r in range(P)]
