"""Attention over a packed varlen batch with a paged KV cache.

A step's batch holds, for each sequence, a chunk of new tokens (a prefill chunk or one
decode token) at positions [ctx_len - q_len, ctx_len). Their K/V are first written into
the cache at `slot_mapping`, then every query attends causally to its sequence's cached
keys through the sequence's block table. The torch backend below loops over sequences
(CPU and reference); a fused GPU backend can replace it behind the same call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Per-step layout of the packed batch (host lists are small: one entry per sequence)."""

    query_starts: list[int]  # [B + 1], sequence b's new tokens are rows query_starts[b]:query_starts[b+1]
    context_lens: list[int]  # [B], tokens in the cache for b after this step's write
    block_tables: list[torch.Tensor]  # B × [num_blocks_b] int64, cache blocks of b in order
    slot_mapping: torch.Tensor  # [T] int64, flat cache row (block * block_size + offset) of each new token
    sliding_window: int | None = None


class KVCache:
    """K and V of every layer in fixed-size blocks: [num_blocks * block_size, kv_heads, head_dim]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype, device):
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks * block_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """k, v: [T, kv_heads, head_dim] stored at rows slot_mapping [T]."""
        self.k[layer].index_copy_(0, slot_mapping, k)
        self.v[layer].index_copy_(0, slot_mapping, v)

    def rows(self, block_table: torch.Tensor, length: int) -> torch.Tensor:
        """Flat cache rows [length] of a sequence's first `length` tokens."""
        offsets = torch.arange(self.block_size, device=block_table.device)
        return (block_table.unsqueeze(1) * self.block_size + offsets).reshape(-1)[:length]


def paged_attention_torch(
    q: torch.Tensor,  # [T, heads, head_dim]
    cache: KVCache,
    layer: int,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, heads, head_dim]
    if q.shape[0] == len(meta.context_lens):  # one new token per sequence: a pure decode step
        return _decode_attention(q, cache, layer, meta, scale)
    out = torch.empty_like(q)
    heads = q.shape[1]
    for b, ctx in enumerate(meta.context_lens):
        start, end = meta.query_starts[b], meta.query_starts[b + 1]
        q_len = end - start
        if q_len == 0:
            continue
        rows = cache.rows(meta.block_tables[b], ctx)
        k = cache.k[layer][rows]  # [ctx, kv_heads, D]
        v = cache.v[layer][rows]
        groups = heads // k.shape[1]
        k = k.repeat_interleave(groups, dim=1).transpose(0, 1)  # [heads, ctx, D]
        v = v.repeat_interleave(groups, dim=1).transpose(0, 1)
        qb = q[start:end].transpose(0, 1)  # [heads, q_len, D]
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device).unsqueeze(1)  # [q_len, 1]
        k_pos = torch.arange(ctx, device=q.device).unsqueeze(0)  # [1, ctx]
        allowed = k_pos <= q_pos  # [q_len, ctx]
        if meta.sliding_window is not None:
            allowed &= k_pos > q_pos - meta.sliding_window
        o = F.scaled_dot_product_attention(qb, k, v, attn_mask=allowed, scale=scale)  # [heads, q_len, D]
        out[start:end] = o.transpose(0, 1)
    return out


def _decode_attention(q: torch.Tensor, cache: KVCache, layer: int, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """All sequences at once when each feeds one token: contexts padded to the longest, masked."""
    batch, heads, _ = q.shape
    lens = torch.tensor(meta.context_lens, device=q.device)  # [B]
    longest = int(max(meta.context_lens))
    tables = torch.nn.utils.rnn.pad_sequence(meta.block_tables, batch_first=True)  # [B, max blocks]
    offsets = torch.arange(cache.block_size, device=q.device)
    rows = (tables.unsqueeze(2) * cache.block_size + offsets).reshape(batch, -1)[:, :longest]  # [B, L]
    k = cache.k[layer][rows]  # [B, L, KVH, D]
    v = cache.v[layer][rows]
    groups = heads // k.shape[2]
    k = k.repeat_interleave(groups, dim=2).transpose(1, 2)  # [B, H, L, D]
    v = v.repeat_interleave(groups, dim=2).transpose(1, 2)
    k_pos = torch.arange(longest, device=q.device).unsqueeze(0)  # [1, L]
    allowed = k_pos < lens.unsqueeze(1)  # [B, L]
    if meta.sliding_window is not None:
        allowed &= k_pos > (lens - 1).unsqueeze(1) - meta.sliding_window
    o = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=allowed[:, None, None, :], scale=scale)  # [B, H, 1, D]
    return o.squeeze(2)
