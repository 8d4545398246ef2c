"""Torch's CPU threads across the engine's Python threads, when the model runs on the CPU.

OpenMP gives every Python thread that runs a parallel torch op its own team of workers.
Once the teams hold more threads than there are cores, libgomp stops spinning between
parallel regions and parks its workers, so every small op pays a sleep and a wake-up:
measured on a 2-core machine (torch 2.13, OpenMP), a [4, 128] x [128, 16] matmul in a
second thread took 4 µs with one torch thread and 140 µs with two, once the main thread
had run a parallel op. So on the CPU only the engine thread, which runs the model, gets
more than one torch thread, and it leaves a core to the Python threads beside it (front
ends, event delivery, the helpers); the helpers (adapter loader, validator, writer) and
the admin calls that convert an upload run their small tensor work on one. Beside a GPU
the engine thread's own CPU work is small, and the helpers keep torch's threads for the
CPU side of conversions (reading and checking an adapter's tensors).

Building an engine on the CPU (loading the model, allocating the KV cache) runs on a
thread of its own that ends when the build does (`in_passing_thread`): the OpenMP team its
ops start ends with it, where the caller's (the main thread's) would stay beside the engine
thread's for the life of the process, past the core count on any machine once the engine
takes every core but one.

torch.set_num_threads also sets the count that threads started afterwards begin with
(the first torch op of a new thread copies it), so once a helper has set its one, later
threads (gRPC handlers among them) start on one as well, until they set their own: the
engine thread does.

(Not at a lower CPU priority either: a niced helper that holds the GIL when the OS parks
it stalls the engine thread. On bench/cold_adapter.py, CPU, the p99 of the steps that
overlap a load went from ~2.0x to 2.0-3.2x the no-load median with the validator at nice 19.)"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch


def engine_cpu_threads(requested: int | None) -> int:
    """Torch threads for the engine thread on the CPU: `requested`, or every core this
    process may use but one (at least one)."""
    if requested is not None:
        return requested
    return max(1, len(os.sched_getaffinity(0)) - 1)


def helper_executor(name: str, device: torch.device) -> ThreadPoolExecutor:
    """A one-worker executor for a helper of an engine whose model is on `device`: its
    thread runs torch ops on one CPU thread when that is the CPU."""
    if device.type != "cpu":
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=torch.set_num_threads, initargs=(1,))


@contextmanager
def helper_torch_threads(device: torch.device):
    """Runs the block's torch ops on one CPU thread when the model is on the CPU, then
    restores the calling thread's count (an admin RPC's thread converting an upload would
    otherwise start a team of its own)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def in_passing_thread(fn, *args):
    """fn(*args) on a thread that ends when it returns (the caller waits for it; its
    exception is re-raised here): the OpenMP team torch starts for its ops ends with it."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = fn(*args)
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            outcome["error"] = error

    thread = threading.Thread(target=run, name="engine-build", daemon=True)  # daemon: Ctrl-C during a load exits
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
