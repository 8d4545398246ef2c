"""The step context: everything one forward step reads besides the weights, in device
buffers sized once and rewritten in place every step.

    input_ids, positions, kv_rows    [max_tokens]            int32
    context_lens                     [max_seqs]              int32
    logits_rows                      [max_tokens]            int32
    query_starts                     [max_seqs + 1]          int32
    block_tables                     [max_seqs, max_blocks]  int32
    carried tokens                   [2, max_seqs]           int32  (token index, row in carry_from)
    + the token→slot mapping (kernels/mapping.py): the tokens' slots, their segments and
      the kernels' tiles, built on the host into the same staging area

A token whose id the previous step sampled and the host has not read yet (overlapped
steps, server/engine/in_flight.py) is staged as a (token index, row) pair, and `fill`
copies its id from that row of the previous step's ids, on the device.

`fill` writes a step's values into ONE host staging buffer (pinned on CUDA) and copies it
to the device in ONE transfer; no per-sequence tensors are made. The model's layers hold
a reference to the context (`LlamaModel.bind`) and read it: their forward takes only the
hidden states. Views of the buffers for a given token and sequence count are the same
tensors every step, so a decode step captured in a CUDA graph reads the new contents
when it is replayed. The host-side fields (`num_tokens`, `num_seqs`, `max_query_len`, and
`attention` for the torch attention backend) are set from the plan, never read back
from the device.

It knows nothing of requests or sampling: the runner fills it from the scheduler's plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.kernels.mapping import LoraMapping, LoraMappingBuffers
from loraplex.server.model.attention import AttentionMetadata, KVCache


@dataclass(frozen=True)
class StepInputs:
    """One step on the host (from the plan), in the packed order of its sequences."""

    input_ids: list[int]  # [T]
    positions: list[int]  # [T]
    kv_rows: list[int]  # [T], flat cache row of each new token
    token_slots: list[int]  # [T], adapter slot, -1 = base (only the mapping holds them on the device)
    query_starts: list[int]  # [B + 1]
    context_lens: list[int]  # [B], tokens in the cache after this step
    block_tables: list[list[int]]  # B × [blocks of b]
    logits_rows: list[int]  # rows whose next-token logits are wanted
    # tokens fed from the previous step's sampled ids on the device (their input_ids
    # entries are placeholders): token indices, their rows in carry_from, and [B'] int64
    carry_tokens: list[int] = ()
    carry_rows: list[int] = ()
    carry_from: torch.Tensor | None = None


class StepContext:
    def __init__(self, cache: KVCache, max_tokens: int, max_seqs: int, max_blocks: int, num_slots: int,
                 device: torch.device, sliding_window: int | None = None, host_layout: bool = False):  # fmt: skip
        """host_layout: also keep the host-side attention layout each step (the torch
        attention backend reads it; the Triton one reads the device buffers only)."""
        self.cache = cache
        self.max_tokens, self.max_seqs, self.max_blocks = max_tokens, max_seqs, max_blocks
        self.block_size = cache.block_size
        self.sliding_window = sliding_window
        self.device = device
        self.host_layout = host_layout
        sizes = [max_tokens] * 3 + [max_seqs, max_tokens, max_seqs + 1, max_seqs * max_blocks, 2 * max_seqs,
                                    LoraMappingBuffers.size(max_tokens, num_slots)]  # fmt: skip
        offsets = [0]
        for n in sizes:
            offsets.append(offsets[-1] + n)
        self._offsets = offsets
        cuda = device.type == "cuda"
        self._host = torch.zeros(offsets[-1], dtype=torch.int32, pin_memory=cuda)  # the staging area
        self._dev = torch.zeros(offsets[-1], dtype=torch.int32, device=device) if cuda else self._host
        self._host_np = self._host.numpy()
        self._copied = torch.cuda.Event() if cuda else None  # the last copy out of the staging area
        views = [self._dev[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        self._input_ids, self._positions, self._kv_rows, self._context_lens, self._logits_rows, self._query_starts, tables, carry, _ = views
        self._block_tables = tables.view(max_seqs, max_blocks)  # [max_seqs, max_blocks]
        self._carry = carry.view(2, max_seqs)  # [2, max_seqs]: token indices, rows in carry_from
        # the token→slot mapping, built on the host into the last part of the staging area
        self.mapping_buffers = LoraMappingBuffers(max_tokens, num_slots, device, self._host[offsets[-2] :], self._dev[offsets[-2] :])
        # per step (host)
        self.num_tokens = 0
        self.num_seqs = 0
        self.num_logits = 0
        self.max_query_len = 0
        self.mapping: LoraMapping | None = None
        self.attention: AttentionMetadata | None = None  # the torch attention backend's host-side layout

    # -- views of this step ------------------------------------------------------------------
    @property
    def input_ids(self) -> torch.Tensor:  # [T] int32
        return self._input_ids[: self.num_tokens]

    @property
    def positions(self) -> torch.Tensor:  # [T] int32
        return self._positions[: self.num_tokens]

    @property
    def kv_rows(self) -> torch.Tensor:  # [T] int32
        return self._kv_rows[: self.num_tokens]

    @property
    def logits_rows(self) -> torch.Tensor:  # [num_logits] int32
        return self._logits_rows[: self.num_logits]

    @property
    def block_tables(self) -> torch.Tensor:  # [max_seqs, max_blocks] int32 (rows past num_seqs: stale)
        return self._block_tables

    @property
    def context_lens(self) -> torch.Tensor:  # [max_seqs] int32
        return self._context_lens

    @property
    def query_starts(self) -> torch.Tensor:  # [max_seqs + 1] int32
        return self._query_starts

    # -- the runner's side -------------------------------------------------------------------
    def _carry_ids(self, c: int, carry_from: torch.Tensor) -> None:
        """input_ids[carry[0, i]] = carry_from[carry[1, i]] for i < c, on the device. A
        failed row's −1 (SAMPLING_FAILED) is fed as 0: its request ends when the host
        reads it, and an embedding must never see a negative id."""
        ids = carry_from.index_select(0, self._carry[1, :c]).clamp_(min=0)  # [c] int64
        self._input_ids.index_copy_(0, self._carry[0, :c].long(), ids.to(torch.int32))

    def fill(self, step: StepInputs, pad_tokens: int = 0, pad_seqs: int = 0) -> None:
        """Stages `step` and copies it to the device in one transfer. pad_tokens /
        pad_seqs: extra base-only tokens and empty sequences after the real ones (a CUDA
        graph bucket's padding): their KV rows are -1 (written nowhere)."""
        t, b = len(step.input_ids), len(step.context_lens)
        nt, nb = t + pad_tokens, b + pad_seqs
        if nt > self.max_tokens or nb > self.max_seqs:
            raise ValueError(f"a step of {nt} tokens and {nb} sequences exceeds the context ({self.max_tokens}, {self.max_seqs})")
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has left the staging area
        h, o = self._host_np, self._offsets
        for k, values in enumerate((step.input_ids, step.positions, step.kv_rows)):
            h[o[k] : o[k] + t] = values
            h[o[k] + t : o[k] + nt] = (0, 0, -1)[k]
        h[o[3] : o[3] + b] = step.context_lens
        h[o[3] + b : o[3] + nb] = 0
        h[o[4] : o[4] + len(step.logits_rows)] = step.logits_rows
        h[o[5] : o[5] + b + 1] = step.query_starts
        h[o[5] + b + 1 : o[5] + nb + 1] = step.query_starts[-1]
        tables = h[o[6] : o[7]].reshape(self.max_seqs, self.max_blocks)
        for i, row in enumerate(step.block_tables):
            if len(row) > self.max_blocks:
                raise ValueError(f"a block table of {len(row)} blocks exceeds the context's {self.max_blocks}")
            tables[i, : len(row)] = row
        c = len(step.carry_tokens)
        if c:
            carry = h[o[7] : o[8]].reshape(2, self.max_seqs)
            carry[0, :c], carry[1, :c] = step.carry_tokens, step.carry_rows
        self.mapping_buffers.stage(step.token_slots if not pad_tokens else list(step.token_slots) + [-1] * pad_tokens)
        if self._dev is not self._host:
            self._dev.copy_(self._host, non_blocking=True)
            self._copied.record(torch.cuda.current_stream(self.device))
        if c:
            self._carry_ids(c, step.carry_from)
        self.num_tokens, self.num_seqs, self.num_logits = nt, nb, len(step.logits_rows)
        self.max_query_len = max((e - s for s, e in zip(step.query_starts, step.query_starts[1:])), default=0)
        self.mapping = self.mapping_buffers.views(nt, any_adapter=any(s >= 0 for s in step.token_slots))
        if not self.host_layout:
            return
        self.attention = AttentionMetadata(
            query_starts=list(step.query_starts) + [step.query_starts[-1]] * pad_seqs,
            context_lens=list(step.context_lens) + [0] * pad_seqs,
            block_tables=[torch.tensor(row, dtype=torch.int64) for row in step.block_tables] + [torch.zeros(0, dtype=torch.int64)] * pad_seqs,
            slot_mapping=self.kv_rows,
            sliding_window=self.sliding_window,
        )
