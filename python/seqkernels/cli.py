"""``seqkernels-bench``: where seqkernels stands against PyTorch, in time and in memory.

    seqkernels-bench speed  [--device cpu|cuda] [--ops attention,lstm] [--quick] [--out DIR]
    seqkernels-bench memory [--device cpu|cuda] [--seq-lens 256,512,...] [--out DIR]

Both print a table and write JSON, CSV and a PNG plot into --out (default bench/results/).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import sys

import torch

DEFAULT_OUT = os.path.join("bench", "results")


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def machine_description(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:  # the model name, and the family and model numbers (a VM may name only "AMD EPYC")
        fields = {}
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip():
                    break
        if "model name" in fields:
            cpu = fields["model name"]
            if "cpu family" in fields and "model" in fields:
                cpu += f" (family {fields['cpu family']} model {fields['model']})"
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def _metadata(device: str) -> dict:
    import seqkernels

    return dict(date=datetime.date.today().isoformat(), device=device, machine=machine_description(device),
                torch=torch.__version__, seqkernels=seqkernels.__version__)


def _check_device(device: str) -> str:
    if device not in ("cpu", "cuda"):
        raise CliError(f"--device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    return device


def _write(out_dir: str, stem: str, meta: dict, rows: list[dict], extra: dict | None = None) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{stem}.json"), os.path.join(out_dir, f"{stem}.csv")]
    with open(paths[0], "w") as f:
        json.dump(dict(meta=meta, rows=rows, **(extra or {})), f, indent=1)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(paths[1], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return paths


def _table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """cols: (header, key, format); a column no row has a value for is left out."""
    cols = [c for c in cols if any(r.get(c[1]) is not None for r in rows)] or cols
    cells = [[h for h, _, _ in cols]]
    for r in rows:
        cells.append([("" if r.get(k) is None else format(r[k], fmt)) for _, k, fmt in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --- speed -----------------------------------------------------------------------------------

def cmd_speed(args) -> int:
    from .profiling.suites import SPEED_SUITES, run_speed

    device = _check_device(args.device)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()] if args.ops else list(SPEED_SUITES)
    separate = {"decode": _speed_decode, "transformers": _speed_transformers}  # suites with their own tables
    unknown = [o for o in ops if o not in SPEED_SUITES and o not in separate]
    if unknown:
        raise CliError(f"unknown op {unknown[0]!r}; choose from {', '.join(SPEED_SUITES)}, {', '.join(separate)}")
    for name, run in separate.items():
        if name in ops:
            run(args, device)
    ops = [o for o in ops if o not in separate]
    if not ops:
        return 0
    rows = run_speed(ops, device, args.quick, repeat=args.repeat)
    meta = _metadata(device)
    print(f"\nspeed on {meta['machine']} ({meta['date']}, torch {meta['torch']}); times are medians in ms")
    print(_table(rows, [("op", "op", ""), ("mode", "mode", ""), ("shape", "shape", ""), ("dtype", "dtype", ""),
                        ("seqkernels", "seqkernels_ms", ".2f"), ("torch", "torch_ms", ".2f"),
                        ("reference", "reference_ms", ".2f"), ("cell loop", "cell_loop_ms", ".2f"),
                        ("lengths", "lengths_ms", ".2f"), ("best SDPA backend", "best_sdpa_backend_ms", ".2f"),
                        ("vs best backend", "speedup_vs_best_sdpa", ".2f"),
                        ("vs torch", "speedup_vs_torch", ".2f"), ("vs cell loop", "speedup_vs_cell_loop", ".2f"),
                        ("GFLOP/s", "seqkernels_gflops", ".0f"), ("torch GFLOP/s", "torch_gflops", ".0f")]))
    # the full grid is speed_<device>; a run of some families gets its own files
    stem = f"speed_{device}" if set(ops) == set(SPEED_SUITES) else f"speed_{device}_{'-'.join(ops)}"
    paths = _write(args.out, stem, meta, rows)
    png = os.path.join(args.out, f"{stem}.png")
    if _plot_speed(rows, png, meta):
        paths.append(png)
    print("wrote " + ", ".join(paths))
    return 0


def _plot_speed(rows, path, meta) -> bool:
    att = [r for r in rows if r["op"].startswith("attention") and "L" in r]
    if len({r["L"] for r in att}) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for op in sorted({r["op"] for r in att}):
            sel = sorted((r for r in att if r["op"] == op and r["mode"] == mode), key=lambda r: r["L"])
            for col, style in (("seqkernels", "-o"), ("torch", "--s"), ("reference", ":^")):
                pts = [(r["L"], r[f"{col}_ms"]) for r in sel if r.get(f"{col}_ms") is not None]
                if pts:
                    ax.plot(*zip(*pts), style, label=f"{col} ({op})")
        ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="median time (ms)",
               title=f"attention {mode}, B=1 H=8 D=64 float32")
    _finish_plot(plt, fig, axes, meta, path)
    return True


def _finish_plot(plt, fig, axes, meta, path) -> None:
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{meta['machine']} — {meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- memory ----------------------------------------------------------------------------------

def _parse_lens(text: str) -> list[int]:
    try:
        lens = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CliError(f"--seq-lens must be comma-separated integers, got {text!r}") from None
    if not lens or any(n < 1 for n in lens):
        raise CliError(f"--seq-lens must be positive integers, got {text!r}")
    return sorted(set(lens))


def cmd_memory(args) -> int:
    from .profiling.suites import run_memory

    device = _check_device(args.device)
    lens = _parse_lens(args.seq_lens)
    rows, fits = run_memory(lens, device)
    meta = _metadata(device)
    print(f"\npeak extra memory on {meta['machine']} ({meta['date']}), attention B=1 H=8 D=64 float32, MiB")
    mib = [dict(r, peak_mib=r["peak_bytes"] / 2**20, inputs_mib=r["inputs_bytes"] / 2**20,
                scores_mib=r["scores_bytes"] / 2**20, output_mib=r["output_bytes"] / 2**20)
           for r in rows if r["op"] == "attention"]
    print(_table(mib, [("impl", "impl", ""), ("mode", "mode", ""), ("L", "L", "d"), ("peak", "peak_mib", ".1f"),
                       ("theory: inputs O(nd)", "inputs_mib", ".1f"), ("scores O(n^2)", "scores_mib", ".1f"),
                       ("output O(nd)", "output_mib", ".1f")]))
    lstm = [dict(r, peak_mib=r["peak_bytes"] / 2**20) for r in rows if r["op"] == "lstm"]
    if lstm:
        print("\nLSTM training (forward+backward), B=16 I=H=256 float32, peak extra MiB over sequence length T")
        print(_table(lstm, [("impl", "impl", ""), ("T", "L", "d"), ("peak", "peak_mib", ".1f")]))
    print("\nfitted exponent of peak memory vs length (log-log; seqkernels and sdpa from L >= 1024):")
    for k, p in fits.items():
        print(f"  {k:<32} {'n/a' if p is None else format(p, '.2f')}")
    stem = f"memory_{device}"
    paths = _write(args.out, stem, meta, rows, dict(fitted_exponents=fits))
    png = os.path.join(args.out, f"{stem}.png")
    _plot_memory(rows, fits, png, meta)
    paths.append(png)
    print("wrote " + ", ".join(paths))
    return 0


def _plot_memory(rows, fits, path, meta) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    colors = {"reference": "tab:red", "sdpa": "tab:blue", "seqkernels": "tab:green"}
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        att = [r for r in rows if r["op"] == "attention"]
        for impl, color in colors.items():
            sel = sorted((r for r in att if r["impl"] == impl and r["mode"] == mode), key=lambda r: r["L"])
            if not sel:
                continue
            p = fits.get(f"attention {impl} {mode}")
            label = f"{impl} (slope {p:.2f})" if p is not None else impl
            ax.plot([r["L"] for r in sel], [r["peak_bytes"] / 2**20 for r in sel], "-o", color=color, label=label)
        lens = sorted({r["L"] for r in att})
        th = {r["L"]: r for r in att}
        ax.plot(lens, [th[n]["scores_bytes"] / 2**20 for n in lens], ":", color="gray", label="score matrix n² (theory)")
        ax.plot(lens, [th[n]["output_bytes"] / 2**20 for n in lens], "--", color="gray", label="output n·d (theory)")
        ax.set(xscale="log", yscale="log", xlabel="sequence length n", ylabel="peak extra memory (MiB)",
               title=f"attention {mode}: B=1 H=8 D=64 float32")
    _finish_plot(plt, fig, axes, meta, path)


def _speed_decode(args, device: str) -> None:
    from .profiling.decode import decode_grid, run_decode
    from .profiling.suites import Progress

    bar = Progress(len(decode_grid(args.quick)), "decode")
    rows, bw = run_decode(device, args.quick, repeat=args.repeat, progress=bar)
    bar.close()
    meta = dict(_metadata(device), **bw)
    print(f"\ndecode steps on {meta['machine']} ({meta['date']}, torch {meta['torch']}); medians in ms; read "
          f"bandwidth {bw['read_GBps_16MiB']:.1f} GB/s (16 MiB) / {bw['read_GBps_1GiB']:.1f} GB/s (1 GiB)")
    print(_table(rows, [("shape", "shape", ""), ("dtype", "dtype", ""), ("seqkernels", "seqkernels_ms", ".3f"),
                        ("torch SDPA", "torch_ms", ".3f"), ("general kernel", "general_ms", ".3f"),
                        ("vs torch", "speedup_vs_torch", ".2f"), ("vs general", "speedup_vs_general", ".2f"),
                        ("GB/s", "seqkernels_GBps", ".1f"), ("torch GB/s", "torch_GBps", ".1f"),
                        ("share of read bw", "share_of_read_bw", ".2f"),
                        ("vs own fp32", "speedup_vs_own_float32", ".2f")]))
    stem = f"speed_{device}_decode"
    paths = _write(args.out, stem, meta, rows)
    png = os.path.join(args.out, f"{stem}.png")
    if _plot_decode(rows, png, meta):
        paths.append(png)
    print("wrote " + ", ".join(paths))


def _speed_transformers(args, device: str) -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise CliError("--ops transformers needs Hugging Face transformers: pip install 'seqkernels[transformers]'")
    if device != "cpu":
        raise CliError("--ops transformers measures the CPU (the GPU model benchmark is not written yet)")
    from .profiling.suites import Progress
    from .profiling.transformers import grid, run_transformers

    bar = Progress(len(grid(args.quick)), "transformers")
    rows, limits = run_transformers(args.quick, repeat=args.repeat, progress=bar)
    bar.close()
    meta = dict(_metadata(device), **limits, transformers=transformers.__version__)
    print(f"\na small Llama in transformers {transformers.__version__} on {meta['machine']} ({meta['date']}, torch "
          f"{meta['torch']}); medians in ms; matmul roof "
          + ", ".join(f"{k.split('_')[-1]} {v:.0f} GFLOP/s" for k, v in limits.items() if k.startswith("matmul"))
          + f"; read bandwidth {limits['read_GBps_1GiB']:.1f} GB/s")
    print(_table(rows, [("kind", "kind", ""), ("L", "L", "d"), ("B", "B", "d"), ("padding", "padding", ""),
                        ("dtype", "dtype", ""), ("seqkernels", "seqkernels_ms", ".1f"), ("sdpa", "sdpa_ms", ".1f"),
                        ("eager", "eager_ms", ".1f"), ("tokens/s", "seqkernels_tokens_per_s", ".0f"),
                        ("sdpa tokens/s", "sdpa_tokens_per_s", ".0f"), ("vs sdpa", "speedup_vs_sdpa", ".2f"),
                        ("vs eager", "speedup_vs_eager", ".2f"), ("GFLOP/s", "seqkernels_gflops", ".0f"),
                        ("share of roof", "share_of_matmul_roof", ".2f"), ("GB/s", "seqkernels_GBps", ".1f"),
                        ("share of read bw", "share_of_read_bw", ".2f")]))
    stem = f"speed_{device}_transformers"
    print("wrote " + ", ".join(_write(args.out, stem, meta, rows)))


def _plot_decode(rows, path, meta) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = sorted({(r["B"], r["dtype"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.6), squeeze=False)
    for ax, (B, dt) in zip(axes[0], groups):
        sel = sorted((r for r in rows if r["B"] == B and r["dtype"] == dt), key=lambda r: r["Lk"])
        for col, label in (("seqkernels_ms", "seqkernels"), ("torch_ms", "torch SDPA"), ("general_ms", "general kernel")):
            if all(r.get(col) for r in sel):
                ax.plot([r["Lk"] for r in sel], [r[col] for r in sel], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"B={B} H=32 Hk=8 D=128 {dt}", fontsize=9)
        ax.set_xlabel("cache length")
        ax.set_ylabel("step time (ms)")
    _finish_plot(plt, fig, list(axes[0]), meta, path)
    return True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqkernels-bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("speed", help="forward and forward+backward times against PyTorch")
    s.add_argument("--device", default="cpu")
    s.add_argument("--ops", default=None, help="comma-separated op families (default: all)")
    s.add_argument("--quick", action="store_true", help="a one-minute run: one shape per op")
    s.add_argument("--repeat", type=int, default=7, help="timed runs per point (median reported)")
    s.add_argument("--out", default=DEFAULT_OUT)
    s.set_defaults(func=cmd_speed)
    m = sub.add_parser("memory", help="peak memory against sequence length")
    m.add_argument("--device", default="cpu")
    m.add_argument("--seq-lens", default="256,512,1024,2048,4096,8192,16384")
    m.add_argument("--out", default=DEFAULT_OUT)
    m.set_defaults(func=cmd_memory)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as e:
        print(f"seqkernels-bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
