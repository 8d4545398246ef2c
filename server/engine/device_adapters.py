"""The device slots: which adapter version sits in which slot, pins held by running
requests, LRU eviction of adapters no running request uses, and the loads in flight.

A load never blocks the engine thread. `acquire` (or `prefetch`) picks the slot and the
rank pages on the engine thread (AdapterPages' books, evicting the fewest least recently
used unpinned adapters that make room, or nothing when even evicting them all would
not), then has the tensor writes done. On CUDA the engine thread issues them itself, on
a side stream from pinned memory (a few launches for the whole model: adapter_stacks.py)
and records an event; the first step that uses the slot waits for that event on the
device (`join_loads`), and steps for other adapters run meanwhile, so a cold adapter
from the host cache is served in the very step that asked for it. On the CPU a writer
thread does the same writes synchronously, since there they are the copies themselves;
until they are done `acquire` answers None and the request waits. A failed write frees
its slot and pages and is reported once through `failure`.

Engine thread only, except the writer's `AdapterPages.apply` (CPU).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Hashable

import torch

from loraplex.server.engine.adapter_pages import AdapterPages, StagedAdapter
from loraplex.server.engine.threads import helper_executor

log = logging.getLogger(__name__)


@dataclass
class SlotCounters:
    loads: int = 0  # adapters written into a slot
    evictions: int = 0  # adapters removed from a slot to make room
    write_failures: int = 0  # loads whose tensor writes failed


class DeviceAdapters:
    def __init__(self, pages: AdapterPages, num_slots: int, inline_writes: bool | None = None):
        """inline_writes: issue the writes on the calling (engine) thread rather than on
        the writer thread; None: on CUDA, where issuing is cheap and the copies run on the
        side stream."""
        if num_slots < 1:
            raise ValueError("the adapter pool needs at least one slot")
        self.pages = pages
        self.num_slots = num_slots
        self._slot_of: "OrderedDict[Hashable, int]" = OrderedDict()  # key -> slot, least recently used first
        self._loading: dict[Hashable, Future] = {}  # key -> writes in flight (result: a CUDA event or None)
        self._pins: dict[Hashable, int] = {}
        self._doomed: set[Hashable] = set()  # removed while pinned: freed at the last release
        self._failed: dict[Hashable, BaseException] = {}
        self._free = list(range(num_slots - 1, -1, -1))
        self._event_of: dict[Hashable, object] = {}  # key -> CUDA event after its writes, until a step waits for it
        self._events: list = []  # CUDA events the next step must wait for
        cuda = pages.device.type == "cuda"
        self._stream = torch.cuda.Stream(pages.device) if cuda else None
        self._inline = cuda if inline_writes is None else inline_writes
        self._writer = helper_executor("adapter-writer", pages.device)
        self.counters = SlotCounters()

    @property
    def resident(self) -> list[Hashable]:
        return list(self._slot_of)

    def slot_of(self, key: Hashable) -> int | None:
        return self._slot_of.get(key)

    def is_loading(self, key: Hashable) -> bool:
        return key in self._loading

    @property
    def total_pins(self) -> int:
        return sum(self._pins.values())

    def acquire(self, key: Hashable, staged: StagedAdapter | None) -> int | None:
        """Pins `key` and returns its slot once its writes are issued; starts loading it
        (from `staged`, its host copy; None: not on the host yet) if it is not resident.
        None: not yet (loading, or the slots and pages it needs are pinned)."""
        if key in self._doomed:
            return None  # a removed version is never handed out
        if key not in self._slot_of:
            if staged is None or not self._start(key, staged, evict=True):
                return None
        if not self._ready(key):
            return None
        event = self._event_of.pop(key, None)
        if event is not None:
            self._events.append(event)  # the next step is the first to read the slot
        self._slot_of.move_to_end(key)
        self._pins[key] = self._pins.get(key, 0) + 1
        return self._slot_of[key]

    def prefetch(self, key: Hashable, staged: StagedAdapter) -> bool:
        """Starts loading `key` into free room only (nothing is evicted); True if it is resident or loading."""
        return key in self._slot_of or (key not in self._doomed and self._start(key, staged, evict=False))

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
        if self._pins.get(key) or key in self._loading:
            self._doomed.add(key)
            if key in self._loading and not self._pins.get(key):
                self._ready(key)  # frees it once its writes are done
        else:
            self._drop(key)

    def wait(self, key: Hashable, timeout: float | None = None) -> None:
        """Blocks until `key`'s writes (if any are in flight) are issued or failed: for tools
        and tests that need an adapter resident now; the engine never waits."""
        job = self._loading.get(key)
        if job is not None:
            job.exception(timeout)

    def failure(self, key: Hashable) -> BaseException | None:
        """The error of `key`'s failed load, once (then forgotten: a later acquire tries again)."""
        if key in self._loading:
            self._ready(key)
        return self._failed.pop(key, None)

    def settle(self) -> None:
        """Settles every load whose writes are done (also those nobody asks for any more:
        a request cancelled while its adapter loaded must not leave the slot unevictable)."""
        for key in [k for k, job in self._loading.items() if job.done()]:
            self._ready(key)

    def join_loads(self) -> None:
        """Makes the current stream wait for the loads of slots acquired since the last call
        (a prefetched slot that no step reads yet costs no step a wait)."""
        events, self._events = self._events, []
        for event in events:
            torch.cuda.current_stream(self.pages.device).wait_event(event)

    def close(self) -> None:
        self._writer.shutdown(wait=True, cancel_futures=True)

    # -- internals ---------------------------------------------------------------------------
    def _start(self, key: Hashable, staged: StagedAdapter, evict: bool) -> bool:
        victims = self._victims_for(staged, evict)
        if victims is None:
            return False
        for victim in victims:
            self._drop(victim)
            self.counters.evictions += 1
        slot = self._free.pop()
        plan = self.pages.assign(slot, staged)
        self._slot_of[key] = slot
        self._loading[key] = self._write_now(plan) if self._inline else self._writer.submit(self._write, plan)
        self.counters.loads += 1
        return True

    def _write_now(self, plan) -> Future:
        """The plan's writes, issued on this thread: a done Future, like the writer's."""
        job: Future = Future()
        try:
            job.set_result(self._write(plan))
        except Exception as error:  # noqa: BLE001 - reported through failure(), like the writer's
            job.set_exception(error)
        return job

    def _write(self, plan):
        """The plan's tensor writes (on the side stream on CUDA); a CUDA event after them."""
        if self._stream is None:
            self.pages.apply(plan)
            return None
        # after the work already queued on the engine's stream: a step that returned no
        # logits (no sync) may still be reading the pages of an adapter evicted since
        self._stream.wait_stream(torch.cuda.current_stream(self.pages.device))
        with torch.cuda.stream(self._stream):
            self.pages.apply(plan)
            event = torch.cuda.Event()
            event.record(self._stream)
        return event

    def _ready(self, key: Hashable) -> bool:
        """True once `key`'s writes are issued; a failed load gives its slot back."""
        job = self._loading.get(key)
        if job is None:
            return True
        if not job.done():
            return False
        del self._loading[key]
        error = job.exception()
        if error is not None:
            log.error("writing adapter %r into slot %d failed: %s", key, self._slot_of[key], error)
            self.counters.write_failures += 1
            self._failed[key] = error
            self._doomed.discard(key)
            self._drop(key)
            return False
        if job.result() is not None:
            self._event_of[key] = job.result()
        if key in self._doomed and not self._pins.get(key):
            self._doomed.discard(key)
            self._drop(key)
            return False
        return True

    def _drop(self, key: Hashable) -> None:
        self._event_of.pop(key, None)  # later writes into its pages follow on the same side stream
        slot = self._slot_of.pop(key)
        self.pages.release(slot)
        self._free.append(slot)

    def _victims_for(self, staged: StagedAdapter, evict: bool) -> list[Hashable] | None:
        """The fewest least recently used unpinned, settled adapters whose eviction leaves
        a free slot and room for `staged`, or None if evicting every one would not (then
        nothing is evicted: a request that waits must not empty the pool)."""
        self.settle()
        victims: list[Hashable] = []
        candidates = iter([k for k in self._slot_of if not self._pins.get(k) and k not in self._loading] if evict else [])
        while True:
            if self._free or victims:
                if self.pages.fits(staged, {self._slot_of[v] for v in victims}):
                    return victims
            victim = next(candidates, None)
            if victim is None:
                return None
            victims.append(victim)
