"""Shared benchmark helpers: timing (CUDA events with a cold L2, or wall clock on CPU),
device copy bandwidth, table printing, JSON results and PNG plots beside them. No asserts on timings here:
benchmarks report, tests check."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import torch

from loraplex.startup import quiet_bitsandbytes

quiet_bitsandbytes()  # every benchmark imports this module before bitsandbytes (loraplex/startup.py)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Larger than any GPU's L2 (H100 50 MB, H200 60 MB): zeroing it before each timed call
# evicts the adapter weights, as the other layers of a real forward would.
FLUSH_BYTES = 256 << 20


class Timer:
    """Median time of one call of `fn` on `device`, in microseconds.

    CUDA: each call is preceded by an L2 flush and bracketed by events; the host queues
    the call while the flush runs, so launch overhead is hidden unless the call issues
    more launches than the GPU can absorb (the per-adapter loop), which is then counted,
    as it would be in serving. CPU: wall clock, only meaningful for the smoke run.
    """

    def __init__(
        self, device: torch.device, budget_s: float = 0.5, min_iters: int = 5, max_iters: int = 100, warmup: int = 2
    ):
        self.device = device
        self.budget_s, self.min_iters, self.max_iters, self.warmup = budget_s, min_iters, max_iters, warmup
        self.flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        times: list[float] = []
        start_all = time.perf_counter()
        while len(times) < self.max_iters and (
            len(times) < self.min_iters or time.perf_counter() - start_all < self.budget_s
        ):
            if self.flush is None:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
                continue
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30, iters: int = 10) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written per second)."""
    if device.type != "cuda":
        nbytes = min(nbytes, 64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = Timer(device, budget_s=0.0, min_iters=iters, max_iters=iters)(lambda: dst.copy_(src))
    return 2 * nbytes / (us * 1e-6) / 1e9


def environment(device: torch.device) -> dict:
    import triton

    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return env


def write_json(path: Path | str | None, name: str, payload: dict) -> Path:
    """Writes `payload` to `path`, or to bench/results/<name>-<UTC time>.json."""
    if path is None:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def print_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec); missing values print as '-'."""

    def cell(row, key, spec):
        v = row.get(key)
        return "-" if v is None else format(v, spec)

    cells = [[cell(r, k, s) for k, _, s in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h, _) in enumerate(columns)]
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))


def new_figure(width: float, height: float):
    """A matplotlib Figure (object API: no pyplot state, no display) with an Agg canvas, or
    None, with a note, where matplotlib (of the dev extras) is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed (pip install -e .[dev]): no PNG written", file=sys.stderr)
        return None
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def kernel_timer(device: torch.device, args) -> "Timer":
    """A kernel bench's Timer: one call per measurement under --smoke (the interpreter is
    slow and its timings meaningless), else at least 5 of up to 100 calls after 2 warm-ups."""
    return Timer(device, args.budget, *((1, 1, 0) if args.smoke else (5, 100, 2)))


def write_png(path: Path | str, title: str, panels: Sequence[tuple[str, dict[str, Sequence[tuple[float, float]]]]],
              xlabel: str = "t (s)") -> Path | None:
    """Line plots stacked vertically, one per panel (y label, {series label: [(x, y), ...]}),
    written as a PNG (matplotlib, of the dev extras; None with a note where it is missing).
    Uses matplotlib's object API only: no pyplot state, no display needed."""
    fig = new_figure(8, 2.6 * len(panels))
    if fig is None:
        return None
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (ylabel, series) in zip(axes, panels):
        for label, points in series.items():
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker=".", label=label)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(loc="best", fontsize="small")
    axes[0].set_title(title)
    axes[-1].set_xlabel(xlabel)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def pump_submitted(engine) -> None:
    """What the engine thread does before each step, for a bench that calls `engine.step()`
    itself: moves submitted requests to the scheduler (private attributes: fine in a bench)."""
    with engine._lock:
        incoming, engine._incoming = engine._incoming, []
    engine.scheduler.waiting.extend(incoming)


def add_kernel_bench_args(p, name: str, budget: float) -> None:
    """--smoke, --budget, --out and --seed, as every kernel bench takes them."""
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on CPU through Triton's interpreter (checks results; timings meaningless)")
    p.add_argument("--budget", type=float, default=budget, help="seconds of timing per measurement (at least 5 calls)")
    p.add_argument("--out", type=Path, default=None, help=f"JSON path (default bench/results/{name}-<UTC time>.json)")
    p.add_argument("--seed", type=int, default=0)


def kernel_bench_device(smoke: bool) -> torch.device | None:
    """The device of a kernel bench: the CPU under Triton's interpreter for --smoke (set
    before the kernel modules are imported: @triton.jit reads it at decoration), else
    CUDA; None (after saying why) when there is no CUDA device."""
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        return torch.device("cpu")
    if not torch.cuda.is_available():
        print("no CUDA device: the full table needs a GPU (try --smoke)", file=sys.stderr)
        return None
    return torch.device("cuda")


def write_bandwidth_png(json_path: Path, title: str, rows: Sequence[dict], label_keys: Sequence[str]) -> Path | None:
    """A horizontal bar per row: its bytes/s as a fraction of the measured copy bandwidth
    (row["frac"]), labelled by `label_keys`; written beside the JSON. Rows without "frac"
    (smoke runs time nothing meaningful) are left out; None when there is nothing to draw."""
    rows = [r for r in rows if r.get("frac") is not None]
    if not rows:
        return None
    fig = new_figure(8, 0.8 + 0.22 * len(rows))
    if fig is None:
        return None
    ax = fig.subplots()
    labels = [" ".join(str(r.get(k, "")) for k in label_keys) for r in rows]
    ax.barh(range(len(rows)), [100 * r["frac"] for r in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize="x-small")
    ax.invert_yaxis()
    ax.axvline(100, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("% of the measured device copy bandwidth")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    path = Path(json_path).with_suffix(".png")
    fig.savefig(path, dpi=110)
    return path
