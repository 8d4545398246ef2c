"""Shared benchmark helpers: timing (CUDA events with a cold L2, or wall clock on CPU),
device copy bandwidth, table printing and JSON results. No asserts on timings here:
benchmarks report, tests check."""

from __future__ import annotations

import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import torch

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
