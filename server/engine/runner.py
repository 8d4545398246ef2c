"""Turns a step's plan into one packed batch and runs the model: token ids, positions,
KV-cache rows, block tables and the token→slot mapping go into the step context
(server/engine/step_context.py) in one host→device copy, then the model's forward reads
them and returns the logits of the sequences that need them. A token the previous step
sampled and the host has not read yet is fed from that step's ids on the device."""

from __future__ import annotations

import torch

from loraplex.server.engine.block_manager import BlockManager
from loraplex.server.engine.cuda_graphs import DecodeGraphs, buckets_for
from loraplex.server.engine.scheduler import Scheduled
from loraplex.server.engine.step_context import StepContext, StepInputs
from loraplex.server.model.attention import KVCache
from loraplex.server.model.llama import LlamaModel
from loraplex.server.model.ops import ModelOps


class ModelRunner:
    def __init__(self, model: LlamaModel, blocks: BlockManager, ops: ModelOps, max_batch_tokens: int, max_seqs: int,
                 num_slots: int, max_context: int, cuda_graphs: bool = False):  # fmt: skip
        """cuda_graphs: replay captured graphs for pure decode steps (`capture` first; CUDA only)."""
        c = model.config
        self.model = model
        self.blocks = blocks
        self.ops = ops
        self.device = model.device
        self.cache = KVCache(c.num_layers, blocks.num_blocks, blocks.block_size, c.num_kv_heads, c.head_dim, model.dtype, model.device)
        max_blocks = -(-max_context // blocks.block_size)
        self.step = StepContext(self.cache, max_batch_tokens, max_seqs, max_blocks, num_slots, model.device,
                                c.sliding_window, host_layout=ops.host_layout)  # fmt: skip
        model.bind(self.step, ops, max_context, static_adapters=cuda_graphs)
        self.graphs = DecodeGraphs(model, self.step, buckets_for(max_seqs, max_batch_tokens)) if cuda_graphs else None

    def capture(self) -> None:
        """Captures the decode buckets' graphs (on the engine thread, before serving)."""
        if self.graphs is not None and self.graphs.stats is None:
            self.graphs.capture()

    def run(self, plan: list[Scheduled], carry_from: torch.Tensor | None = None) -> torch.Tensor:
        """Returns [B, vocab] float32 logits, one row per plan entry with wants_logits, in order.
        carry_from: [B'] int64 ids of the previous step, on the device, when sequences of
        the plan hold a token of it in flight (their `in_flight_row` is its row there)."""
        inputs = self.inputs(plan, carry_from)
        if self.graphs is not None and self.graphs.stats is not None:
            logits = self.graphs.run(inputs)  # None unless a pure decode step fits a bucket
            if logits is not None:
                return logits
        self.step.fill(inputs)
        return self.model()

    def inputs(self, plan: list[Scheduled], carry_from: torch.Tensor | None = None) -> StepInputs:
        ids, positions, slots, rows = [], [], [], []
        query_starts, context_lens, tables, logits_rows = [0], [], [], []
        carry_tokens, carry_rows = [], []
        bs = self.blocks.block_size
        for item in plan:
            seq, n = item.seq, item.num_tokens
            start = seq.num_computed
            table = self.blocks.table(seq.seq_id)
            ids.extend(seq.tokens[start : start + n])
            if start + n > len(seq.tokens):  # its last token is still on the device
                if seq.in_flight != 1 or start + n != len(seq.tokens) + 1 or carry_from is None:
                    raise RuntimeError(f"{seq.seq_id}: {seq.in_flight} tokens in flight, feeding {start}..{start + n} of {len(seq.tokens)}")
                carry_tokens.append(len(ids))
                carry_rows.append(seq.in_flight_row)
                ids.append(0)  # placeholder: StepContext.fill copies the id on the device
            positions.extend(range(start, start + n))
            slots.extend([seq.slot] * n)
            rows.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            query_starts.append(query_starts[-1] + n)
            context_lens.append(start + n)
            tables.append(table)
            if item.wants_logits:
                logits_rows.append(query_starts[-1] - 1)
        return StepInputs(ids, positions, rows, slots, query_starts, context_lens, tables, logits_rows,
                          carry_tokens, carry_rows, carry_from if carry_tokens else None)  # fmt: skip
