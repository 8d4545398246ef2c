"""Attention over a packed varlen batch with a paged KV cache.

A step's batch holds, for each sequence, a chunk of new tokens (a prefill chunk or one
decode token) at positions [ctx_len - q_len, ctx_len). Their K/V are first written into
the cache at `slot_mapping`, then every query attends causally to its sequence's cached
keys through the sequence's block table.

Two backends behind one call, `(q, step, layer, scale) -> out`, reading the step
context (server/engine/step_context.py):
- `attention_triton`: our paged attention kernel (kernels/paged_attention.py), K/V read
  in place through the block tables, decode rows and prefill chunks in one launch.
- `attention_torch`, the CPU backend: every sequence that feeds one token (decode) in
  one masked SDPA over contexts padded to the longest, the gather rows and the mask built
  once per step (`AttentionMetadata.decode_layout`) and shared by all layers; sequences
  with a longer chunk (prefill) take one SDPA each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    _decode: "DecodeLayout | None" = field(default=None, repr=False)  # built by decode_layout()

    def decode_layout(self, block_size: int, device: torch.device) -> "DecodeLayout":
        """The step's decode sequences and their gather rows and mask (built once per step)."""
        if self._decode is None:
            self._decode = DecodeLayout.build(self, block_size, device)
        return self._decode


@dataclass
class DecodeLayout:
    """Sequences of the step that feed exactly one token, attended in one batched SDPA."""

    seqs: list[int]  # [Bd] sequence indices
    q_rows: torch.Tensor  # [Bd] int64, their rows of q
    kv_rows: torch.Tensor  # [Bd, L] int64, cache rows of their contexts, padded to the longest (L)
    allowed: torch.Tensor  # [Bd, 1, 1, L] bool, keys each may attend to
    all_decode: bool  # every sequence of the step feeds one token (q_rows is then 0..B-1)

    @classmethod
    def build(cls, meta: AttentionMetadata, block_size: int, device: torch.device) -> "DecodeLayout":
        starts = meta.query_starts
        seqs = [b for b in range(len(meta.context_lens)) if starts[b + 1] - starts[b] == 1]
        q_rows = torch.tensor([starts[b] for b in seqs], dtype=torch.int64, device=device)
        if not seqs:
            empty = torch.zeros(0, 0, dtype=torch.int64, device=device)
            return cls(seqs, q_rows, empty, empty.bool().view(0, 1, 1, 0), False)
        lens_list = [meta.context_lens[b] for b in seqs]
        longest = max(lens_list)
        tables = torch.nn.utils.rnn.pad_sequence([meta.block_tables[b] for b in seqs], batch_first=True)  # [Bd, max blocks]
        offsets = torch.arange(block_size, device=device)
        kv_rows = (tables.to(device).unsqueeze(2) * block_size + offsets).reshape(len(seqs), -1)[:, :longest]  # [Bd, L]
        lens = torch.tensor(lens_list, device=device)  # [Bd]
        k_pos = torch.arange(longest, device=device).unsqueeze(0)  # [1, L]
        allowed = k_pos < lens.unsqueeze(1)  # [Bd, L]
        if meta.sliding_window is not None:
            allowed &= k_pos > (lens - 1).unsqueeze(1) - meta.sliding_window
        all_decode = len(seqs) == len(meta.context_lens) and starts[-1] == len(seqs)
        return cls(seqs, q_rows, kv_rows, allowed[:, None, None, :], all_decode)


class KVCache:
    """K and V of every layer in fixed-size blocks: [num_blocks * block_size, kv_heads, head_dim]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype, device):
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks * block_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

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
    decode = meta.decode_layout(cache.block_size, q.device)
    if decode.all_decode:  # a pure decode step: rows of q are the sequences in order
        return _decode_attention(q, cache, layer, decode, scale)
    out = torch.empty_like(q)
    if decode.seqs:
        out[decode.q_rows] = _decode_attention(q[decode.q_rows], cache, layer, decode, scale)
    heads = q.shape[1]
    for b, ctx in enumerate(meta.context_lens):
        start, end = meta.query_starts[b], meta.query_starts[b + 1]
        q_len = end - start
        if q_len <= 1:  # nothing to do, or done above
            continue
        rows = cache.rows(meta.block_tables[b], ctx)
        k = cache.k[layer][rows].transpose(0, 1)  # [KVH, ctx, D]
        v = cache.v[layer][rows].transpose(0, 1)
        kv_heads, dim = k.shape[0], k.shape[2]
        groups = heads // kv_heads
        # the G query heads of a KV head as G·q_len queries of that one head: no K/V copy per head
        qb = q[start:end].reshape(q_len, kv_heads, groups, dim).permute(1, 2, 0, 3).reshape(kv_heads, groups * q_len, dim)
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device).unsqueeze(1)  # [q_len, 1]
        k_pos = torch.arange(ctx, device=q.device).unsqueeze(0)  # [1, ctx]
        allowed = k_pos <= q_pos  # [q_len, ctx]
        if meta.sliding_window is not None:
            allowed &= k_pos > q_pos - meta.sliding_window
        o = F.scaled_dot_product_attention(qb, k, v, attn_mask=allowed.repeat(groups, 1), scale=scale)  # [KVH, G·q_len, D]
        out[start:end] = o.view(kv_heads, groups, q_len, dim).permute(2, 0, 1, 3).reshape(q_len, heads, dim)
    return out


def _decode_attention(q: torch.Tensor, cache: KVCache, layer: int, decode: DecodeLayout, scale: float) -> torch.Tensor:
    """q: [Bd, H, D], one token of each decode sequence -> [Bd, H, D], contexts padded and
    masked. The G = H / KVH query heads of a KV head attend as G queries of that one head,
    so K and V are gathered once, not repeated per query head."""
    bd, heads, dim = q.shape
    k = cache.k[layer][decode.kv_rows].transpose(1, 2)  # [Bd, KVH, L, D]
    v = cache.v[layer][decode.kv_rows].transpose(1, 2)
    kv_heads = k.shape[1]
    qg = q.reshape(bd, kv_heads, heads // kv_heads, dim)  # [Bd, KVH, G, D]: head h reads KV head h // G
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=decode.allowed, scale=scale)  # [Bd, KVH, G, D]
    return o.reshape(bd, heads, dim)


def attention_torch(q: torch.Tensor, step, layer: int, scale: float) -> torch.Tensor:
    """q [T, H, D] -> [T, H, D] from the step's host-side layout (StepContext.attention)."""
    return paged_attention_torch(q, step.cache, layer, step.attention, scale)


def attention_triton(q: torch.Tensor, step, layer: int, scale: float) -> torch.Tensor:
    """q [T, H, D] -> [T, H, D], reading the step's device buffers only."""
    from loraplex.kernels.paged_attention import paged_attention

    cache = step.cache
    return paged_attention(
        q, cache.k[layer], cache.v[layer], step.block_tables, step.context_lens, step.query_starts,
        step.num_seqs, step.max_query_len, cache.block_size, scale, step.sliding_window,
    )  # fmt: skip
