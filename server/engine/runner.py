"""Turns a step's plan into one packed batch and runs the model: token ids, positions,
KV-cache rows, block tables and the token→slot mapping (written once per step into
preallocated buffers), then returns the logits of the sequences that need them."""

from __future__ import annotations

import torch

from loraplex.kernels.backend import LoraOps
from loraplex.kernels.mapping import LoraMappingBuffers
from loraplex.server.engine.block_manager import BlockManager
from loraplex.server.engine.scheduler import Scheduled
from loraplex.server.model.attention import AttentionMetadata, KVCache
from loraplex.server.model.llama import LlamaModel


class ModelRunner:
    def __init__(self, model: LlamaModel, blocks: BlockManager, ops: LoraOps, max_batch_tokens: int):
        c = model.config
        self.model = model
        self.blocks = blocks
        self.ops = ops
        self.device = model.device
        self.cache = KVCache(c.num_layers, blocks.num_blocks, blocks.block_size, c.num_kv_heads, c.head_dim, model.dtype, model.device)
        self.mapping_buffers = LoraMappingBuffers(max_batch_tokens, model.num_slots, model.device)

    def run(self, plan: list[Scheduled]) -> torch.Tensor:
        """Returns [B, vocab] float32 logits, one row per plan entry with wants_logits, in order."""
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
            tables.append(torch.tensor(table, dtype=torch.int64, device=self.device))
            if item.wants_logits:
                logits_rows.append(query_starts[-1] - 1)
        dev = self.device
        meta = AttentionMetadata(
            query_starts=query_starts,
            context_lens=context_lens,
            block_tables=tables,
            slot_mapping=torch.tensor(rows, dtype=torch.int64, device=dev),
            sliding_window=self.model.config.sliding_window,
        )
        mapping = self.mapping_buffers.update(torch.tensor(slots, dtype=torch.int32))
        return self.model(
            torch.tensor(ids, dtype=torch.int64, device=dev),
            torch.tensor(positions, dtype=torch.int64, device=dev),
            self.cache,
            meta,
            mapping,
            self.ops,
            torch.tensor(logits_rows, dtype=torch.int64, device=dev),
        )
