"""Continuous batching at step granularity: which sequences run this step and how
many new tokens each feeds (a prefill chunk or one decode token), within a token budget,
the KV blocks and the adapter slots. Preempts (by recomputation) the most recently
admitted sequence when a running one needs a block and none is free.

It changes block tables and adapter pins (through the adapter manager, which also
prefetches the adapters of waiting requests) but runs no model; the engine thread is its
only caller."""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

from loraplex.server.engine.block_manager import BlockManager
from loraplex.server.engine.errors import UnknownAdapter
from loraplex.server.engine.sequence import Sequence


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_tokens: int = 2048  # tokens fed per step (prefill chunks + decode tokens)
    max_running: int = 64  # sequences in the running batch

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1 or self.max_running < 1:
            raise ValueError("max_batch_tokens and max_running must be ≥ 1")


@dataclass(frozen=True)
class Scheduled:
    seq: Sequence
    num_tokens: int  # fed this step: tokens[num_computed : num_computed + num_tokens]

    @property
    def wants_logits(self) -> bool:
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, adapters):
        self.config = config
        self.blocks = blocks
        self.adapters = adapters  # AdapterManager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: preemption takes the last
        self.preemptions = 0
        self.adapter_gone: list[Sequence] = []  # waiting sequences whose adapter was removed: the engine ends them

    def schedule(self) -> list[Scheduled]:
        budget = self.config.max_batch_tokens
        plan: list[Scheduled] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq not in self.running:  # preempted below for an earlier one
                continue
            if seq.winding_down:
                continue  # it ends when its token in flight lands
            n = min(seq.pending, budget)
            while not self.blocks.can_grow(seq.seq_id, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq not in self.running:
                continue
            self.blocks.grow(seq.seq_id, seq.num_computed + n)
            plan.append(Scheduled(seq, n))
            budget -= n
        self._admit(plan, budget)
        # the next batch's worth of waiting requests: further back, the slots would churn before they run
        upcoming = itertools.islice(self.waiting, self.config.max_running)
        self.adapters.prefetch(s.adapter_key for s in upcoming if s.adapter_key is not None and not s.admitted)
        return plan

    def _admit(self, plan: list[Scheduled], budget: int) -> None:
        skipped: list[Sequence] = []
        try:
            while self.waiting and budget > 0 and len(self.running) < self.config.max_running:
                seq = self.waiting.popleft()
                skipped.append(seq)  # until admitted: back in line whatever happens below
                if seq.winding_down:
                    continue  # preempted with its last token in flight: no recompute, it ends when the token lands
                try:
                    bound = self._bind_adapter(seq)
                except UnknownAdapter:
                    skipped.pop()
                    self.adapter_gone.append(seq)
                    continue
                if not bound:
                    continue  # its adapter is loading or every slot is pinned: others may go
                n = min(seq.pending, budget)
                if not self.blocks.can_grow(seq.seq_id, seq.num_computed + n):
                    break  # first come, first served for KV blocks
                skipped.pop()
                self.blocks.grow(seq.seq_id, seq.num_computed + n)
                self.running.append(seq)
                plan.append(Scheduled(seq, n))
                budget -= n
        finally:
            self.waiting.extendleft(reversed(skipped))

    def _bind_adapter(self, seq: Sequence) -> bool:
        """Pins the sequence's adapter in a slot. False: not yet (loading, or every slot
        pinned). UnknownAdapter: the adapter was removed while the sequence waited."""
        if seq.admitted or seq.adapter_key is None:
            seq.admitted = True
            return True
        seq.adapter_key = self.adapters.current_key(seq.adapter_key)  # replaced meanwhile: bind the version current now
        slot = self.adapters.acquire(seq.adapter_key)
        if slot is None:
            return False
        seq.slot, seq.admitted = slot, True
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Frees `seq`'s blocks and puts it back first in line; it recomputes its tokens."""
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.num_computed = 0
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Removes `seq` wherever it is and returns its blocks and adapter pin."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.seq_id)
        if seq.admitted and seq.adapter_key is not None:
            self.adapters.release(seq.adapter_key)
        seq.admitted = False
