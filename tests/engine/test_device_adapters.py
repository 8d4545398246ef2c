"""DeviceAdapters: slots, pins, LRU eviction, rank pages as a second limit, and loads
that run on the writer thread (a failed one gives its slot and pages back)."""

import threading

import torch

from loraplex.server.engine.device_adapters import DeviceAdapters


class Budget:
    """Stands in for AdapterPages: rank pages of two pools (two target modules); an
    adapter's 'staged' form is its page needs per pool, e.g. (1, 0)."""

    device = torch.device("cpu")

    def __init__(self, pages=(4, 4)):
        self.total = list(pages)
        self.held = {}  # slot -> needs
        self.writes = []
        self.fail = set()  # needs whose apply raises
        self.gate = None  # threading.Event that apply waits for

    def fits(self, needs, evicted):
        freed = [sum(self.held.get(s, (0, 0))[i] for s in evicted) for i in range(2)]
        return all(f + e >= n for f, e, n in zip(self.pages_free(), freed, needs))

    def pages_free(self):
        used = [sum(h[i] for h in self.held.values()) for i in range(2)]
        return [t - u for t, u in zip(self.total, used)]

    def assign(self, slot, needs):
        assert slot not in self.held and self.fits(needs, set()), "assigned without room"
        self.held[slot] = tuple(needs)
        return slot, tuple(needs)

    def apply(self, plan):
        if self.gate is not None:
            assert self.gate.wait(5)
        if plan[1] in self.fail:
            raise RuntimeError("device write failed")
        self.writes.append(plan)

    def release(self, slot):
        self.held.pop(slot, None)


def make(slots=4, pages=(4, 4)):
    b = Budget(pages)
    return DeviceAdapters(b, slots), b


def acquire(pool, key, needs):
    """acquire, then once more after the writes it started are done."""
    slot = pool.acquire(key, needs)
    if slot is None and pool.is_loading(key):
        pool.wait(key, 5)
        slot = pool.acquire(key, needs)
    return slot


def test_a_load_runs_on_the_writer_and_the_slot_is_handed_out_once_written():
    pool, b = make()
    b.gate = threading.Event()
    assert pool.acquire("a", (1, 1)) is None and pool.is_loading("a")  # the engine thread does not wait
    assert pool.acquire("a", None) is None  # still loading: not handed out, not loaded twice
    b.gate.set()
    pool.wait("a", 5)
    assert pool.acquire("a", None) == 0 and pool.counters.loads == 1 and len(b.writes) == 1
    pool.close()


def test_small_adapters_share_the_pages_of_one_large():
    pool, b = make()
    for k in "abcd":
        assert acquire(pool, k, (1, 1)) is not None
    assert b.pages_free() == [0, 0] and pool.counters.evictions == 0
    for k in "abcd":
        pool.release(k)
    acquire(pool, "a", (1, 1))  # a becomes most recently used
    pool.release("a")
    slot = acquire(pool, "big", (4, 2))
    assert slot is not None and pool.counters.evictions == 4  # needs every page of pool 0
    assert pool.resident == ["big"] and b.pages_free() == [0, 2]


def test_evicts_only_as_many_as_needed_least_recent_first():
    pool, b = make(slots=8)
    for k in "abcd":
        acquire(pool, k, (1, 0))
        pool.release(k)
    acquire(pool, "e", (2, 0))
    assert pool.resident == ["c", "d", "e"] and pool.counters.evictions == 2


def test_nothing_is_evicted_when_pinned_pages_leave_no_room():
    pool, b = make()
    acquire(pool, "pinned", (3, 0))
    acquire(pool, "idle", (1, 0))
    pool.release("idle")
    assert acquire(pool, "big", (2, 0)) is None  # even evicting "idle" frees 1 page only
    assert pool.resident == ["pinned", "idle"] and pool.counters.evictions == 0
    pool.release("pinned")
    assert acquire(pool, "big", (2, 0)) is not None
    assert pool.counters.evictions == 1 and set(pool.resident) == {"idle", "big"}


def test_a_free_slot_is_not_enough_without_pages_and_pages_not_without_a_slot():
    pool, b = make(slots=2, pages=(8, 8))
    acquire(pool, "a", (1, 1))
    acquire(pool, "b", (1, 1))
    assert acquire(pool, "c", (1, 1)) is None  # pages free, both slots pinned
    pool.release("b")
    assert acquire(pool, "c", (1, 1)) is not None and pool.resident == ["a", "c"]


def test_removed_while_pinned_keeps_its_pages_until_released_and_is_never_handed_out():
    pool, b = make()
    acquire(pool, "a", (4, 0))
    pool.remove("a")
    assert pool.acquire("a", (4, 0)) is None  # the doomed version is not handed out again
    assert acquire(pool, "b", (1, 0)) is None
    pool.release("a")
    assert b.pages_free() == [4, 4] and acquire(pool, "b", (1, 0)) is not None


def test_a_loading_adapter_is_not_evicted_and_a_removed_one_is_freed_when_written():
    pool, b = make(slots=1)
    b.gate = threading.Event()
    assert pool.acquire("a", (1, 0)) is None
    assert pool.acquire("b", (1, 0)) is None and pool.resident == ["a"]  # "a" is loading: not a victim
    pool.remove("a")
    b.gate.set()
    pool.wait("a", 5)
    assert pool.failure("a") is None and pool.resident == []
    assert acquire(pool, "b", (1, 0)) == 0


def test_failed_write_gives_the_slot_and_pages_back_and_is_reported_once():
    pool, b = make(slots=1)
    b.fail.add((1, 0))
    assert acquire(pool, "a", (1, 0)) is None
    assert pool.resident == [] and b.pages_free() == [4, 4] and pool.counters.write_failures == 1
    error = pool.failure("a")
    assert isinstance(error, RuntimeError) and pool.failure("a") is None
    assert acquire(pool, "b", (2, 0)) == 0  # the slot serves the next adapter


def test_prefetch_uses_free_room_only():
    pool, b = make(slots=2)
    acquire(pool, "a", (3, 0))
    pool.release("a")
    assert not pool.prefetch("b", (2, 0))  # would need to evict "a"
    assert pool.prefetch("c", (1, 0)) and pool.resident == ["a", "c"]
    pool.wait("c", 5)
    assert pool.acquire("c", None) is not None and pool.counters.evictions == 0


def test_a_finished_load_nobody_asks_for_is_still_evictable():
    pool, b = make(slots=1)
    b.gate = threading.Event()
    assert pool.acquire("x", (1, 0)) is None  # its request was cancelled before it was admitted
    b.gate.set()
    pool.wait("x", 5)
    assert acquire(pool, "y", (1, 0)) == 0 and pool.resident == ["y"] and pool.counters.evictions == 1


class StreamRecorder:
    """Stands in for torch.cuda.current_stream(): records the events a step waits for."""

    def __init__(self):
        self.waited = []

    def wait_event(self, event):
        self.waited.append(event)


def test_inline_writes_hand_out_the_slot_at_once_and_a_step_waits_only_for_the_slots_it_reads(monkeypatch):
    b = Budget()
    pool = DeviceAdapters(b, 4, inline_writes=True)  # what CUDA does: the engine thread issues the writes
    write = pool._write
    pool._write = lambda plan: (write(plan), f"event {plan[0]}")[1]  # the event recorded after the writes
    stream = StreamRecorder()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    assert pool.acquire("a", (1, 1)) == 0 and len(b.writes) == 1  # served by the step that asked: no extra step
    assert pool.prefetch("b", (1, 0)) and pool.slot_of("b") == 1
    pool.join_loads()
    assert stream.waited == ["event 0"]  # the prefetched slot costs this step no wait
    assert pool.acquire("b", None) == 1
    pool.join_loads()
    pool.join_loads()
    assert stream.waited == ["event 0", "event 1"]  # each event once, in the first step that reads its slot
    b.fail.add((2, 0))
    assert pool.acquire("c", (2, 0)) is None and isinstance(pool.failure("c"), RuntimeError)
    assert pool.slot_of("c") is None and b.pages_free() == [2, 3]  # the failed write gave its slot and pages back
    pool.close()
