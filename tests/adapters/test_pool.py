"""AdapterPool: slots, pins, LRU eviction, and rank pages as a second limit (`fits`)."""

import pytest

from loraplex.adapters.pool import AdapterPool


class Budget:
    """Rank pages of two pools (two target modules); an adapter's 'weights' are its page
    needs per pool, e.g. (1, 0)."""

    def __init__(self, pages=(4, 4)):
        self.total = list(pages)
        self.held = {}  # slot -> needs
        self.writes = []

    def fits(self, weights, evicted):
        freed = [sum(self.held.get(s, (0, 0))[i] for s in evicted) for i in range(2)]
        return all(f + e >= n for f, e, n in zip(self.pages_free(), freed, weights))

    def pages_free(self):
        used = [sum(h[i] for h in self.held.values()) for i in range(2)]
        return [t - u for t, u in zip(self.total, used)]

    def write(self, slot, weights):
        assert all(f >= n for f, n in zip(self.pages_free(), weights)), "written without room"
        self.held[slot] = tuple(weights)
        self.writes.append((slot, tuple(weights)))

    def clear(self, slot):
        self.held.pop(slot, None)


def make(slots=4, pages=(4, 4)):
    b = Budget(pages)
    return AdapterPool(slots, b.write, b.clear, fits=b.fits), b


def test_small_adapters_share_the_pages_of_one_large():
    pool, b = make()
    for k in "abcd":
        assert pool.acquire(k, lambda: (1, 1)) is not None
    assert b.pages_free() == [0, 0] and pool.counters.evictions == 0
    for k in "abcd":
        pool.release(k)
    pool.acquire("a", lambda: (1, 1))  # a becomes most recently used
    pool.release("a")
    slot = pool.acquire("big", lambda: (4, 2))
    assert slot is not None and pool.counters.evictions == 4  # needs every page of pool 0
    assert pool.resident == ["big"] and b.pages_free() == [0, 2]


def test_evicts_only_as_many_as_needed_least_recent_first():
    pool, b = make(slots=8)
    for k in "abcd":
        pool.acquire(k, lambda: (1, 0))
        pool.release(k)
    pool.acquire("e", lambda: (2, 0))
    assert pool.resident == ["c", "d", "e"] and pool.counters.evictions == 2


def test_nothing_is_evicted_when_pinned_pages_leave_no_room():
    pool, b = make()
    pool.acquire("pinned", lambda: (3, 0))
    pool.acquire("idle", lambda: (1, 0))
    pool.release("idle")
    assert pool.acquire("big", lambda: (2, 0)) is None  # even evicting "idle" frees 1 page only
    assert pool.resident == ["pinned", "idle"] and pool.counters.evictions == 0
    pool.release("pinned")
    assert pool.acquire("big", lambda: (2, 0)) is not None
    assert pool.counters.evictions == 1 and set(pool.resident) == {"idle", "big"}


def test_a_free_slot_is_not_enough_without_pages_and_pages_not_without_a_slot():
    pool, b = make(slots=2, pages=(8, 8))
    pool.acquire("a", lambda: (1, 1))
    pool.acquire("b", lambda: (1, 1))
    assert pool.acquire("c", lambda: (1, 1)) is None  # pages free, both slots pinned
    pool.release("b")
    assert pool.acquire("c", lambda: (1, 1)) is not None and pool.resident == ["a", "c"]


def test_removed_while_pinned_keeps_its_pages_until_released():
    pool, b = make()
    pool.acquire("a", lambda: (4, 0))
    pool.remove("a")
    assert pool.acquire("b", lambda: (1, 0)) is None
    pool.release("a")
    assert b.pages_free() == [4, 4] and pool.acquire("b", lambda: (1, 0)) is not None


def test_failed_write_gives_the_slot_back():
    b = Budget()

    def write(slot, weights):
        raise RuntimeError("device write failed")

    pool = AdapterPool(1, write, b.clear, fits=b.fits)
    with pytest.raises(RuntimeError):
        pool.acquire("a", lambda: (1, 0))
    assert pool.resident == []
    pool._write = b.write
    assert pool.acquire("a", lambda: (1, 0)) == 0


def test_without_a_budget_slots_are_the_only_limit():
    writes = []
    pool = AdapterPool(2, lambda s, w: writes.append(s), lambda s: None)
    assert pool.acquire("a", lambda: None) is not None and pool.acquire("b", lambda: None) is not None
    pool.release("a")
    assert pool.acquire("c", lambda: None) is not None and pool.resident == ["b", "c"]
