"""Torch's CPU threads across the engine's Python threads.

OpenMP gives every Python thread that runs a parallel torch op its own team of workers.
Once the teams hold more threads than there are cores, libgomp stops spinning between
parallel regions and parks its workers, so every small op pays a sleep and a wake-up:
measured on a 2-core machine (torch 2.13, OpenMP), a [4, 128] x [128, 16] matmul in a
second thread took 4 µs with one torch thread and 140 µs with two, once the main thread
had run a parallel op. So only the engine thread, which runs the model, gets more than one
torch thread; the helpers (adapter loader, validator, writer) and the admin calls that
convert an upload run their small tensor work on one, and the engine keeps a core free for the Python threads beside it (front ends,
event delivery, the helpers)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch


def engine_cpu_threads(requested: int | None) -> int:
    """Torch threads for the engine thread on the CPU: `requested`, or every core this
    process may use but one (at least one)."""
    if requested is not None:
        return requested
    return max(1, len(os.sched_getaffinity(0)) - 1)


def helper_executor(name: str) -> ThreadPoolExecutor:
    """A one-worker executor whose thread runs torch ops on one CPU thread. (Not at a lower
    CPU priority: a niced thread that holds the GIL when the OS parks it stalls the engine
    thread; on the cold_adapter bench, CPU, the p99 of steps overlapping a load went from
    ~2.0x to 2.0-3.2x the no-load median with the validator at nice 19.)"""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=torch.set_num_threads, initargs=(1,))


@contextmanager
def one_torch_thread():
    """Runs the block's torch ops on one CPU thread, then restores the calling thread's count
    (an admin RPC's thread converting an upload: it would otherwise start a team of its own)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
