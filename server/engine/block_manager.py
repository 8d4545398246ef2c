"""KV-cache blocks: a free list and one block table per sequence. Refuses (returns
False / raises NoFreeBlocks) rather than over-committing; never allocates a block twice."""

from __future__ import annotations

from collections import deque


class NoFreeBlocks(Exception):
    """Not enough free KV blocks."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be ≥ 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks(self, seq_id: str, num_tokens: int) -> int:
        """Blocks `seq_id` still needs to hold `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(self._tables.get(seq_id, ())))

    def can_grow(self, seq_id: str, num_tokens: int, reserve: int = 0) -> bool:
        return self.extra_blocks(seq_id, num_tokens) + reserve <= len(self._free)

    def grow(self, seq_id: str, num_tokens: int) -> list[int]:
        """Extends `seq_id`'s table to hold `num_tokens` tokens; returns the whole table."""
        need = self.extra_blocks(seq_id, num_tokens)
        if need > len(self._free):
            raise NoFreeBlocks(f"{seq_id} needs {need} blocks, {len(self._free)} free")
        table = self._tables.setdefault(seq_id, [])
        table.extend(self._free.popleft() for _ in range(need))
        return table

    def table(self, seq_id: str) -> list[int]:
        return self._tables.get(seq_id, [])

    def free(self, seq_id: str) -> int:
        """Returns `seq_id`'s blocks to the free list (no-op if it holds none)."""
        table = self._tables.pop(seq_id, [])
        self._free.extend(table)
        return len(table)

    def check(self) -> None:
        """Invariant: every block is either free or in exactly one table."""
        owned = [b for t in self._tables.values() for b in t]
        all_blocks = owned + list(self._free)
        if sorted(all_blocks) != list(range(self.num_blocks)):
            raise AssertionError("block accounting is broken: a block is lost or owned twice")
