"""The scheduler hands the adapter manager's prefetch the adapters of the next batch's
worth of waiting requests, in queue order: further back, slots would churn before those
requests run."""

from types import SimpleNamespace

from loraplex.server.engine.block_manager import BlockManager
from loraplex.server.engine.request import SamplingParams
from loraplex.server.engine.scheduler import Scheduler, SchedulerConfig
from loraplex.server.engine.sequence import Sequence


class ColdAdapters:
    """Stands in for AdapterManager: every adapter is still loading; prefetch calls are recorded."""

    def __init__(self):
        self.prefetched = []

    def current_key(self, key):
        return key

    def acquire(self, key):
        return None

    def prefetch(self, keys):
        self.prefetched.append(list(keys))


def seq(i, adapter):
    handle = SimpleNamespace(request=SimpleNamespace(request_id=f"r{i}", params=SamplingParams(max_new_tokens=8)))
    return Sequence(handle, adapter, [1, 2, 3], 3, seed=0)


def test_prefetch_sees_the_next_max_running_waiting_requests_in_queue_order():
    adapters = ColdAdapters()
    scheduler = Scheduler(SchedulerConfig(max_batch_tokens=64, max_running=3), BlockManager(16, 16), adapters)
    scheduler.waiting.extend([seq(0, "a"), seq(1, None), seq(2, "b"), seq(3, "c"), seq(4, "d")])
    plan = scheduler.schedule()
    assert [s.seq.seq_id for s in plan] == ["r1"]  # the base request runs; the others wait for their adapters
    assert adapters.prefetched == [["a", "b", "c"]]  # the first 3 waiting ("r1" is running now), not "d"
    scheduler.schedule()
    assert adapters.prefetched[-1] == ["a", "b", "c"]
