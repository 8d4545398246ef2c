"""The free rank pages of one adapter slice's page pool (kernels/rank_pages.py).

`take(n)` hands out the lowest run of n consecutive free pages when there is one (an
adapter in consecutive pages is a plain view for the CPU ops), else the n lowest free
pages: the kernels read any page order. Called at adapter load and unload only.
"""

from __future__ import annotations

import bisect


class PageFreeList:
    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = list(range(num_pages))  # sorted ascending

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self, n: int) -> list[int]:
        """n page ids, removed from the free list; ValueError if fewer are free."""
        if n > len(self._free):
            raise ValueError(f"{n} rank pages wanted, {len(self._free)} of {self.num_pages} free")
        if n == 0:
            return []
        f = self._free
        for i in range(len(f) - n + 1):
            if f[i + n - 1] - f[i] == n - 1:  # sorted and distinct: a consecutive run
                ids = f[i : i + n]
                del f[i : i + n]
                return ids
        ids = f[:n]
        del f[:n]
        return ids

    def give(self, ids: list[int]) -> None:
        """Returns pages to the free list."""
        for p in ids:
            i = bisect.bisect_left(self._free, p)
            if i < len(self._free) and self._free[i] == p:
                raise AssertionError(f"page {p} freed twice")
            self._free.insert(i, p)
