"""threads.py: torch's CPU threads in the engine's helper threads."""

import os
import threading

import torch

from loraplex.server.engine.threads import engine_cpu_threads, helper_executor, one_torch_thread


def _in_thread():
    return torch.get_num_threads(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_engine_threads_default_to_every_core_but_one():
    assert engine_cpu_threads(None) == max(1, len(os.sched_getaffinity(0)) - 1)
    assert engine_cpu_threads(3) == 3


def test_helpers_run_on_one_torch_thread_at_the_callers_priority():
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    pool = helper_executor("test-helper")
    try:
        assert pool.submit(_in_thread).result(timeout=10) == (1, own)
    finally:
        pool.shutdown()


def test_one_torch_thread_restores_the_callers_count():
    before = torch.get_num_threads()
    with one_torch_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
