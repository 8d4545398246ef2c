"""Per-step token→slot metadata for the segmented-gather adapter kernels.

The engine computes the slot of every token once per step; `LoraMapping` holds that,
the grouping of tokens by slot, and the work list of the kernels (tiles of at most
`block_m` tokens of one segment), in buffers allocated once, so a decode step can be
captured in a CUDA graph and replayed after the buffers are rewritten in place.
Slot -1 means "base model only": those tokens form the last segment, which the
kernels skip (expand) or zero (shrink).

The build runs on the tokens' device with torch ops only and never synchronises with
the host. The grid of the kernels depends only on host integers (`num_tokens`,
`num_slots`, `block_m`), never on the slot values, so a captured launch stays valid for
any mapping of the same number of tokens. This module knows nothing about adapters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Tile-list markers in `tile_slots` besides a slot id.
BASE_TILE = -1  # a tile of base-only tokens (shrink writes zeros there, expand skips it)
EMPTY_TILE = -2  # a grid slot past the last tile: the program exits at once


def block_m_for(num_tokens: int) -> int:
    """Tokens per tile. 16 is the smallest M of a tensor-core dot: decode batches (one
    token per request, segments of 1-4 tokens) then waste the least work. Past 256
    tokens a step is mostly prefill with long segments, and 64-row tiles read each
    adapter tile 4x less often. Chosen by reasoning, not yet timed on a GPU; both sizes
    compile for sm_90 without spills in shrink and expand at Llama-3-8B's shapes
    (tests/kernels/test_compile_sm90.py)."""
    return 16 if num_tokens <= 256 else 64


def num_tiles_bound(num_tokens: int, num_slots: int, block_m: int) -> int:
    """Upper bound on the tiles of any mapping of `num_tokens` tokens (the kernels' grid).

    With P non-empty segments (at most S slots plus the base segment, at most T),
    sum(ceil(c_p / M)) <= floor((T - P) / M) + P, which grows with P; it never exceeds T.
    """
    if num_tokens == 0:
        return 0
    p = min(num_slots + 1, num_tokens)
    return (num_tokens - p) // block_m + p


@dataclass
class LoraMapping:
    """Views over `LoraMappingBuffers` for the current step (first `num_tokens` rows)."""

    token_slots: torch.Tensor  # [T] int32, slot of each token, -1 = base only
    sorted_tokens: torch.Tensor  # [T] int32, token indices grouped by slot (ascending slot, stable), base tokens last
    slot_starts: torch.Tensor  # [S + 1] int32, slot s's tokens are sorted_tokens[slot_starts[s]:slot_starts[s+1]]
    num_slots: int  # S, slots in the pool
    any_adapter: bool  # host-side: does any token of this step use an adapter (launchers return early if not)
    # The kernels' work list: tile j covers sorted_tokens[tile_starts[j]:tile_ends[j]], all of
    # slot tile_slots[j]. None when the mapping was made by hand; `tiles()` builds them then.
    block_m: int | None = None  # tokens per tile, a function of T only (`block_m_for`)
    tile_slots: torch.Tensor | None = None  # [G] int32, slot, BASE_TILE or EMPTY_TILE; G = num_tiles_bound(T, S, bm)
    tile_starts: torch.Tensor | None = None  # [G] int32, first position in sorted_tokens
    tile_ends: torch.Tensor | None = None  # [G] int32, one past the last position (== start for EMPTY_TILE)

    @property
    def num_tokens(self) -> int:
        return self.token_slots.shape[0]

    def tiles(self) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(block_m, tile_slots, tile_starts, tile_ends); built here if the mapping has none."""
        if self.tile_slots is None:
            t = self.num_tokens
            bm = block_m_for(t)
            g = num_tiles_bound(t, self.num_slots, bm)
            dev = self.token_slots.device
            bufs = [torch.empty(g, dtype=torch.int32, device=dev) for _ in range(3)]
            build_tiles_into(self.slot_starts, t, bm, torch.arange(g, device=dev), *bufs)
            self.block_m, (self.tile_slots, self.tile_starts, self.tile_ends) = bm, bufs
        return self.block_m, self.tile_slots, self.tile_starts, self.tile_ends


class LoraMappingBuffers:
    """Preallocated mapping buffers for up to `max_tokens` tokens and `num_slots` slots.

    `update` rewrites them in place and returns views; views of the same token count
    are the same tensors every step (what a CUDA graph captured).
    """

    def __init__(self, max_tokens: int, num_slots: int, device: torch.device | str = "cpu"):
        self.max_tokens = max_tokens
        self.num_slots = num_slots
        self.device = torch.device(device)
        self.token_slots = torch.full((max_tokens,), -1, dtype=torch.int32, device=self.device)  # [T_max]
        self.sorted_tokens = torch.zeros(max_tokens, dtype=torch.int32, device=self.device)  # [T_max]
        self.slot_starts = torch.zeros(num_slots + 1, dtype=torch.int32, device=self.device)  # [S + 1]
        # the tile list never has more than T entries (num_tiles_bound <= T)
        self.tile_slots = torch.full((max_tokens,), EMPTY_TILE, dtype=torch.int32, device=self.device)  # [G_max]
        self.tile_starts = torch.zeros(max_tokens, dtype=torch.int32, device=self.device)  # [G_max]
        self.tile_ends = torch.zeros(max_tokens, dtype=torch.int32, device=self.device)  # [G_max]
        self._arange = torch.arange(max_tokens, dtype=torch.int64, device=self.device)  # [T_max]
        self._slot_ids = torch.arange(num_slots + 1, dtype=torch.int64, device=self.device)  # [S + 1]

    def update(self, token_slots: torch.Tensor, any_adapter: bool | None = None) -> LoraMapping:
        """Writes the mapping for `token_slots` ([T] int, on any device) in place and returns
        views. any_adapter: whether any slot is >= 0, when the caller knows it on the host
        (None: read from CPU slots, assumed True for device ones)."""
        n = token_slots.shape[0]
        if n > self.max_tokens:
            raise ValueError(f"{n} tokens exceed the mapping capacity {self.max_tokens}")
        slots = self.token_slots[:n]
        slots.copy_(token_slots, non_blocking=True)
        build_mapping_into(slots, self.num_slots, self.sorted_tokens[:n], self.slot_starts, self._slot_ids)
        bm = block_m_for(n)
        g = num_tiles_bound(n, self.num_slots, bm)
        tiles = (self.tile_slots[:g], self.tile_starts[:g], self.tile_ends[:g])
        build_tiles_into(self.slot_starts, n, bm, self._arange[:g], *tiles)
        if any_adapter is None:
            any_adapter = bool((token_slots >= 0).any()) if token_slots.device.type == "cpu" else True
        return LoraMapping(slots, self.sorted_tokens[:n], self.slot_starts, self.num_slots, any_adapter, bm, *tiles)


def build_mapping_into(
    token_slots: torch.Tensor,  # [T] int32
    num_slots: int,
    sorted_tokens: torch.Tensor,  # [T] int32, written
    slot_starts: torch.Tensor,  # [S + 1] int32, written
    slot_ids: torch.Tensor | None = None,  # [S + 1] int64, 0..S (preallocated by the buffers)
) -> None:
    """Groups tokens by slot on the tokens' device, with no host synchronisation
    (no bincount: on CUDA it reads the maximum back to the host)."""
    key = torch.where(token_slots < 0, num_slots, token_slots).long()  # [T], base tokens get key S
    sorted_key, order = torch.sort(key, stable=True)  # [T], [T]
    sorted_tokens.copy_(order)
    if slot_ids is None:
        slot_ids = torch.arange(num_slots + 1, device=token_slots.device)
    # slot_starts[s] = number of tokens with key < s; slot_starts[S] = start of the base segment
    slot_starts.copy_(torch.searchsorted(sorted_key, slot_ids, right=False))


def build_tiles_into(
    slot_starts: torch.Tensor,  # [S + 1] int32
    num_tokens: int,
    block_m: int,
    tile_ids: torch.Tensor,  # [G] int64, 0..G-1
    tile_slots: torch.Tensor,  # [G] int32, written
    tile_starts: torch.Tensor,  # [G] int32, written
    tile_ends: torch.Tensor,  # [G] int32, written
) -> None:
    """Cuts every segment (slots 0..S-1, then the base segment) into tiles of at most
    `block_m` tokens and lists them in order; entries past the last tile get EMPTY_TILE."""
    if tile_ids.numel() == 0:
        return
    num_slots = slot_starts.shape[0] - 1
    seg_starts = slot_starts.long()  # [S + 1], segment S (base) starts at slot_starts[S]
    seg_ends = torch.cat([seg_starts[1:], seg_starts.new_full((1,), num_tokens)])  # [S + 1]
    seg_tiles = (seg_ends - seg_starts + block_m - 1) // block_m  # [S + 1]
    tile_cum = torch.cumsum(seg_tiles, 0)  # [S + 1], inclusive
    seg = torch.searchsorted(tile_cum, tile_ids, right=True)  # [G], segment of tile j (S + 1: none)
    valid = seg <= num_slots
    seg_c = seg.clamp(max=num_slots)
    first = tile_cum[seg_c] - seg_tiles[seg_c]  # [G], index of the segment's first tile
    start = seg_starts[seg_c] + (tile_ids - first) * block_m
    end = torch.minimum(start + block_m, seg_ends[seg_c])
    slot = torch.where(seg_c == num_slots, BASE_TILE, seg_c)
    tile_slots.copy_(torch.where(valid, slot, EMPTY_TILE))
    tile_starts.copy_(torch.where(valid, start, 0))
    tile_ends.copy_(torch.where(valid, end, 0))


def build_mapping(token_slots: torch.Tensor, num_slots: int) -> LoraMapping:
    """One-off mapping in fresh buffers (tests, benchmarks)."""
    buffers = LoraMappingBuffers(max(1, token_slots.shape[0]), num_slots, token_slots.device)
    return buffers.update(token_slots.to(torch.int32))
