"""Turns a step's plan into one packed batch and runs the model: token ids, positions,
KV-cache rows, block tables and the token→slot mapping go into the step context
(server/engine/step_context.py) in one host→device copy, then the model's forward reads
them and returns the logits of the sequences that need them."""

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

    def run(self, plan: list[Scheduled]) -> torch.Tensor:
        """Returns [B, vocab] float32 logits, one row per plan entry with wants_logits, in order."""
        inputs = self.inputs(plan)
        if self.graphs is not None and self.graphs.stats is not None:
            logits = self.graphs.run(inputs)  # None unless a pure decode step fits a bucket
            if logits is not None:
                return logits
        self.step.fill(inputs)
        return self.model()

    def inputs(self, plan: list[Scheduled]) -> StepInputs:
        ids, positions, slots, rows = [], [], [], []
        query_starts, context_lens, tables, logits_rows = [0], [], [], []
        bs = self.blocks.block_size
        for item in plan:
            seq, n = item.seq, item.num_tokens
            start = seq.num_computed
            table = self.blocks.table(seq.seq_id)
            ids.extend(seq.tokens[start : start + n])
            positions.extend(range(start, start + n))
            slots.extend([seq.slot] * n)
            rows.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            query_starts.append(query_starts[-1] + n)
            context_lens.append(start + n)
            tables.append(table)
            if item.wants_logits:
                logits_rows.append(query_starts[-1] - 1)
        return StepInputs(ids, positions, rows, slots, query_starts, context_lens, tables, logits_rows)
