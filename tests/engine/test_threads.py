"""threads.py: torch's CPU threads in the engine's helper threads."""

import os
import threading

import torch

from loraplex.server.engine.threads import engine_cpu_threads, helper_executor, helper_torch_threads


def _in_thread():
    return torch.get_num_threads(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_engine_threads_default_to_every_core_but_one():
    assert engine_cpu_threads(None) == max(1, len(os.sched_getaffinity(0)) - 1)
    assert engine_cpu_threads(3) == 3


def _in_new_thread():
    got = []
    t = threading.Thread(target=lambda: got.append(_in_thread()))
    t.start()
    t.join()
    return got[0]


def test_cpu_helpers_run_on_one_torch_thread_at_the_callers_priority():
    """A CPU model's helpers set one torch thread; a GPU model's keep the count a new thread
    starts with (torch's process-wide one, set to 2 here so that 1 would show)."""
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    before = torch.get_num_threads()
    try:
        for device, want in ((torch.device("cuda"), 2), (torch.device("cpu"), 1)):  # no GPU needed: no CUDA call
            torch.set_num_threads(2)  # also what threads started afterwards begin with
            assert _in_new_thread()[0] == 2
            pool = helper_executor("test-helper", device)
            try:
                assert pool.submit(_in_thread).result(timeout=10) == (want, own)
            finally:
                pool.shutdown()
    finally:
        torch.set_num_threads(before)


def test_helper_torch_threads_restores_the_callers_count():
    before = torch.get_num_threads()
    with helper_torch_threads(torch.device("cpu")):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with helper_torch_threads(torch.device("cuda")):
        assert torch.get_num_threads() == before


BUILD_AND_COUNT = """
import os, sys, torch
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.engine import Engine
torch.set_num_threads(2)  # what the build's thread starts with: an OpenMP team of 2 for its ops
tasks = lambda: len(os.listdir("/proc/self/task"))
before = tasks()
engine = Engine.from_config(EngineConfig(model_dir=sys.argv[1], device="cpu", kv_cache_tokens=1024))
after = tasks()
(torch.randn(256, 256) @ torch.randn(256, 256)).sum()  # the same ops on this thread do leave a worker
print(before, after, tasks())
"""


def test_building_a_cpu_engine_leaves_no_openmp_workers_behind():
    """The build's OpenMP team ends with its passing thread: the process has as many OS
    threads after Engine.from_config as before (the engine thread is not started yet),
    where a parallel op on the calling thread leaves a worker for good."""
    import subprocess
    import sys
    from pathlib import Path

    import loraplex

    tiny = Path(loraplex.__file__).parent / "assets" / "tiny-llama"
    out = subprocess.run([sys.executable, "-c", BUILD_AND_COUNT, str(tiny)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after, with_main_op = map(int, out.stdout.split()[-3:])
    assert after == before and with_main_op > after
