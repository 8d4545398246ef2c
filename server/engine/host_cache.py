"""The host cache of staged adapters (adapter_pages.StagedAdapter, pinned on CUDA):
a least-recently-used map under a byte budget that it never exceeds. Thread-safe: the
loader thread puts, the engine thread gets, admin threads drop retired versions."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Hashable

from loraplex.server.engine.adapter_pages import StagedAdapter


class HostCache:
    def __init__(self, budget_bytes: int):
        if budget_bytes < 1:
            raise ValueError("the host cache budget must be positive")
        self.budget_bytes = budget_bytes
        self._items: "OrderedDict[Hashable, StagedAdapter]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def get(self, key: Hashable) -> StagedAdapter | None:
        with self._lock:
            staged = self._items.get(key)
            if staged is not None:
                self._items.move_to_end(key)
            return staged

    def put(self, key: Hashable, staged: StagedAdapter) -> None:
        """Caches `staged`, dropping least recently used entries to stay in budget;
        ValueError if it alone is over the budget."""
        if staged.nbytes > self.budget_bytes:
            raise ValueError(f"the adapter takes {staged.nbytes} bytes staged, over the host cache's {self.budget_bytes}")
        with self._lock:
            old = self._items.pop(key, None)
            self._bytes -= old.nbytes if old is not None else 0
            while self._items and self._bytes + staged.nbytes > self.budget_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.nbytes
            self._items[key] = staged
            self._bytes += staged.nbytes

    def offer(self, key: Hashable, staged: StagedAdapter) -> bool:
        """Caches `staged` only if it fits without dropping anything (a prefetch, not a need)."""
        with self._lock:
            if key in self._items or self._bytes + staged.nbytes > self.budget_bytes:
                return False
            self._items[key] = staged
            self._bytes += staged.nbytes
            return True

    def drop(self, key: Hashable) -> None:
        with self._lock:
            staged = self._items.pop(key, None)
            if staged is not None:
                self._bytes -= staged.nbytes
