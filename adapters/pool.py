"""The device pool of adapter slots: which adapter version sits in which slot, pins
held by running requests, and LRU eviction of adapters no running request uses.

It owns no tensors: `write(slot, weights)` and `clear(slot)` (the model's adapter
layers) do the copying. Adapters take device memory by rank (rank pages), so a free
slot is not always enough: with `fits(weights, evicted_slots)` (the model's) the LRU
evicts unpinned adapters until both a slot and the pages are free, and evicts nothing
when even evicting them all would not do. Called from the engine thread only.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable

from loraplex.adapters.form import AdapterWeights


@dataclass
class PoolCounters:
    loads: int = 0  # adapters written into a slot
    evictions: int = 0  # adapters removed from a slot to make room


class AdapterPool:
    def __init__(
        self,
        num_slots: int,
        write: Callable[[int, AdapterWeights], None],
        clear: Callable[[int], None],
        fits: Callable[[AdapterWeights, set[int]], bool] | None = None,  # room once these slots are cleared? None: slots are the only limit
    ):
        if num_slots < 1:
            raise ValueError("the adapter pool needs at least one slot")
        self.num_slots = num_slots
        self._write = write
        self._clear = clear
        self._fits = fits
        self._slot_of: "OrderedDict[Hashable, int]" = OrderedDict()  # key -> slot, least recently used first
        self._pins: dict[Hashable, int] = {}
        self._doomed: set[Hashable] = set()  # removed while pinned: freed at the last release
        self._free = list(range(num_slots - 1, -1, -1))
        self.counters = PoolCounters()

    @property
    def resident(self) -> list[Hashable]:
        return list(self._slot_of)

    def slot_of(self, key: Hashable) -> int | None:
        return self._slot_of.get(key)

    def pins(self, key: Hashable) -> int:
        return self._pins.get(key, 0)

    @property
    def total_pins(self) -> int:
        return sum(self._pins.values())

    def acquire(self, key: Hashable, weights: Callable[[], AdapterWeights]) -> int | None:
        """Pins `key` and returns its slot, writing it (weights()) into a free or evicted
        slot if it is not resident. None if the slots or the memory it needs are pinned
        by other adapters (nothing is evicted then)."""
        slot = self._slot_of.get(key)
        if slot is None:
            w = weights()
            victims = self._victims_for(w)
            if victims is None:
                return None
            for victim in victims:
                self._drop(victim)
                self.counters.evictions += 1
            slot = self._free.pop()
            try:
                self._write(slot, w)
            except BaseException:
                self._clear(slot)
                self._free.append(slot)
                raise
            self._slot_of[key] = slot
            self.counters.loads += 1
        self._slot_of.move_to_end(key)
        self._pins[key] = self._pins.get(key, 0) + 1
        return slot

    def release(self, key: Hashable) -> None:
        n = self._pins.get(key, 0) - 1
        if n < 0:
            raise AssertionError(f"release of {key!r} without a pin")
        if n:
            self._pins[key] = n
            return
        del self._pins[key]
        if key in self._doomed:
            self._doomed.discard(key)
            self._drop(key)

    def remove(self, key: Hashable) -> None:
        """Frees `key`'s slot now, or at its last release if running requests use it."""
        if key not in self._slot_of:
            return
        if self._pins.get(key):
            self._doomed.add(key)
        else:
            self._drop(key)

    def _drop(self, key: Hashable) -> None:
        slot = self._slot_of.pop(key)
        self._clear(slot)
        self._free.append(slot)

    def _victims_for(self, weights: AdapterWeights) -> list[Hashable] | None:
        """The fewest least recently used unpinned adapters whose eviction leaves a free
        slot and room for `weights`, or None if evicting every unpinned one would not
        (then nothing is evicted: a request that waits must not empty the pool)."""
        victims: list[Hashable] = []
        candidates = iter([key for key in self._slot_of if not self._pins.get(key)])  # least recently used first
        while True:
            if self._free or victims:
                if self._fits is None or self._fits(weights, {self._slot_of[v] for v in victims}):
                    return victims
            victim = next(candidates, None)
            if victim is None:
                return None
            victims.append(victim)
