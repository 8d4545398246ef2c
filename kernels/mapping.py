"""Per-step token→slot metadata for the segmented-gather adapter kernels.

The engine computes the slot of every token once per step; `LoraMapping` holds that,
the grouping of tokens by slot, and the work list of the kernels (tiles of at most
`block_m` tokens of one segment), in buffers allocated once, so a decode step can be
captured in a CUDA graph and replayed after the buffers are rewritten in place.
Slot -1 means "base model only": those tokens form the last segment, which the
kernels skip (expand) or zero (shrink).

The build runs on the host (numpy), where the engine knows every token's slot, and the
result reaches the device with the step's other inputs in one copy: no launch, no
synchronisation. The grid of the kernels depends only on host integers (`num_tokens`,
`num_slots`, `block_m`), never on the slot values, so a captured launch stays valid for
any mapping of the same number of tokens. This module knows nothing about adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
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

    _groups: "SlotGroups | None" = field(default=None, repr=False, compare=False)  # slot_groups(), built once

    @property
    def num_tokens(self) -> int:
        return self.token_slots.shape[0]

    def slot_groups(self) -> "SlotGroups":
        """The adapter tokens by slot for the torch ops' batched matmuls (`SlotGroups`);
        built on first use from sorted_tokens and slot_starts (read back to the host: a
        sync on CUDA, where only tests call the torch ops), then kept for the step's layers."""
        if self._groups is None:
            self._groups = SlotGroups.build(self.sorted_tokens, self.slot_starts, self.num_slots)
        return self._groups

    def tiles(self) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(block_m, tile_slots, tile_starts, tile_ends); built here if the mapping has none
        (a hand-made mapping, in tests: its slots are read back to the host, a sync on CUDA)."""
        if self.tile_slots is None:  # the tiles follow from the slots alone
            built = build_mapping(self.token_slots, self.num_slots)
            self.block_m, self.tile_slots, self.tile_starts, self.tile_ends = built.tiles()
        return self.block_m, self.tile_slots, self.tile_starts, self.tile_ends


# Segments of at most this many tokens (decode rows, short chunks) share one padded
# batched matmul in the torch ops; a longer segment (a prefill chunk) gets its own.
SHORT_SEGMENT = 16
# Elements of the factors one batched matmul gathers (64 MiB in fp32): past it the slots
# are taken in runs (SlotGroups.runs), so many adapters of a large model stay bounded.
MAX_GATHER = 1 << 24


@dataclass(frozen=True)
class SlotGroups:
    """A step's adapter tokens grouped by slot, for the torch ops (shrink_ref, expand_ref).

    The D slots whose segment has at most SHORT_SEGMENT tokens form one padded batch: row d
    of `tokens` holds slot `slots[d]`'s tokens, padded with its first one, `valid` marks
    the real entries and `rows` lists them (tokens[valid]). Each longer segment is a
    (slot, [T_s] tokens) pair of `long`. So a decode step over D adapters takes one bmm
    per slice instead of D matmuls, and a prefill chunk is not padded to."""

    slots: torch.Tensor  # [D] long
    tokens: torch.Tensor  # [D, M] long, M = the longest short segment
    valid: torch.Tensor  # [D, M] bool
    rows: torch.Tensor  # [N] long, tokens[valid]: N = the short segments' tokens
    long: tuple[tuple[int, torch.Tensor], ...]  # (slot, [T_s] long) per longer segment

    def runs(self, per_slot: int):
        """(slots slice, rows [N_c]) of runs of the batch's slots whose gathered factors,
        `per_slot` elements each, stay under MAX_GATHER (one run unless they would not)."""
        d = self.slots.shape[0]
        size = max(1, MAX_GATHER // max(1, per_slot))
        if size >= d:
            yield slice(0, d), self.rows
            return
        for lo in range(0, d, size):
            part = slice(lo, min(lo + size, d))
            yield part, self.tokens[part][self.valid[part]]

    @staticmethod
    def build(sorted_tokens: torch.Tensor, slot_starts: torch.Tensor, num_slots: int) -> "SlotGroups":
        order = sorted_tokens.cpu().numpy().astype(np.int64)  # [T]
        starts = slot_starts.cpu().numpy().astype(np.int64)  # [S + 1]; base tokens from starts[S]
        counts = starts[1:] - starts[:-1]  # [S]
        short = np.flatnonzero((counts > 0) & (counts <= SHORT_SEGMENT))  # [D]
        m = int(counts[short].max()) if len(short) else 0
        offsets = np.arange(m)[None, :]  # [1, M]
        valid = offsets < counts[short][:, None]  # [D, M]
        at = starts[short][:, None] + np.where(valid, offsets, 0)  # [D, M] positions in sorted_tokens
        tokens = order[at]  # [D, M]
        dev = sorted_tokens.device
        long = tuple((int(s), torch.from_numpy(order[starts[s] : starts[s + 1]]).to(dev)) for s in np.flatnonzero(counts > SHORT_SEGMENT))
        return SlotGroups(torch.from_numpy(short).to(dev), torch.from_numpy(tokens).to(dev), torch.from_numpy(valid).to(dev),
                          torch.from_numpy(tokens[valid]).to(dev), long)  # fmt: skip


class LoraMappingBuffers:
    """Mapping buffers for up to `max_tokens` tokens and `num_slots` slots: one int32 area
    on the device, written from a host area of the same layout in one copy.

        token_slots [T_max] | sorted_tokens [T_max] | slot_starts [S + 1] | tile_slots,
        tile_starts, tile_ends [T_max] each (the tile list never has more than T entries)

    The mapping is built on the host (`build_on_host`, numpy): the engine knows every
    token's slot there, and the build is ~25 tiny ops that would each be a launch on the
    device. `stage` writes the host area, `views` returns the device views of a step;
    views of the same token count are the same tensors every step (what a CUDA graph
    captured). host, dev: an area of `size(max_tokens, num_slots)` int32 elements to
    live in, inside a caller's staging area that the caller copies (the step context's,
    pinned on CUDA); default: its own, which `update` copies.
    """

    @staticmethod
    def size(max_tokens: int, num_slots: int) -> int:
        return 5 * max_tokens + num_slots + 1

    def __init__(self, max_tokens: int, num_slots: int, device: torch.device | str = "cpu",
                 host: torch.Tensor | None = None, dev: torch.Tensor | None = None):  # fmt: skip
        self.max_tokens = max_tokens
        self.num_slots = num_slots
        self.device = torch.device(device)
        n = self.size(max_tokens, num_slots)
        if (host is None) != (dev is None):
            raise ValueError("give both host and dev, or neither")
        if host is None:  # its own area, copied by `update` in a blocking copy: pageable memory does
            host = torch.zeros(n, dtype=torch.int32)
            dev = torch.zeros(n, dtype=torch.int32, device=self.device) if self.device.type != "cpu" else host
        if host.shape != (n,) or dev.shape != (n,) or host.dtype != torch.int32 or dev.dtype != torch.int32:
            raise ValueError(f"host and dev must be int32 [{n}]")
        self._host, self._dev = host, dev
        t = max_tokens
        bounds = [0, t, 2 * t, 2 * t + num_slots + 1, 3 * t + num_slots + 1, 4 * t + num_slots + 1, n]
        parts = list(zip(bounds[:-1], bounds[1:]))
        self._h = [host.numpy()[a:b] for a, b in parts]  # the same six arrays on the host
        self.token_slots, self.sorted_tokens, self.slot_starts, self.tile_slots, self.tile_starts, self.tile_ends = (
            dev[a:b] for a, b in parts)  # fmt: skip

    def stage(self, token_slots) -> None:
        """Writes the mapping of `token_slots` ([T] ints: a list or an int32 array) into the host area."""
        n = len(token_slots)
        if n > self.max_tokens:
            raise ValueError(f"{n} tokens exceed the mapping capacity {self.max_tokens}")
        slots, sorted_tokens, slot_starts, tile_slots, tile_starts, tile_ends = self._h
        slots[:n] = token_slots
        bm = block_m_for(n)
        g = num_tiles_bound(n, self.num_slots, bm)
        build_on_host(slots[:n], self.num_slots, bm, sorted_tokens[:n], slot_starts, tile_slots[:g], tile_starts[:g], tile_ends[:g])

    def views(self, n: int, any_adapter: bool) -> LoraMapping:
        """The device views of a staged mapping of n tokens (after the host area was copied)."""
        bm = block_m_for(n)
        g = num_tiles_bound(n, self.num_slots, bm)
        return LoraMapping(self.token_slots[:n], self.sorted_tokens[:n], self.slot_starts, self.num_slots, any_adapter,
                           bm, self.tile_slots[:g], self.tile_starts[:g], self.tile_ends[:g])  # fmt: skip

    def update(self, token_slots) -> LoraMapping:
        """Stages, copies (blocking) and returns the views: for callers without a staging
        area of their own (tests, benches). token_slots: [T] ints (a device tensor is read
        back to the host)."""
        if torch.is_tensor(token_slots):
            token_slots = token_slots.to("cpu", torch.int32).numpy()
        self.stage(token_slots)
        if self._dev is not self._host:
            self._dev.copy_(self._host)
        return self.views(len(token_slots), any_adapter=bool(len(token_slots)) and int(np.max(token_slots)) >= 0)


def build_on_host(
    token_slots: np.ndarray,  # [T] int32
    num_slots: int,
    block_m: int,
    sorted_tokens: np.ndarray,  # [T] int32, written
    slot_starts: np.ndarray,  # [S + 1] int32, written
    tile_slots: np.ndarray,  # [G] int32, written
    tile_starts: np.ndarray,  # [G] int32, written
    tile_ends: np.ndarray,  # [G] int32, written
) -> None:
    """Groups tokens by slot (stable, base tokens last), then cuts every segment (slots
    0..S-1, then the base segment) into tiles of at most `block_m` tokens and lists them
    in order; entries past the last tile get EMPTY_TILE."""
    t = token_slots.shape[0]
    key = np.where(token_slots < 0, num_slots, token_slots)  # [T], base tokens get key S
    order = np.argsort(key, kind="stable")  # [T]
    sorted_tokens[:] = order
    # slot_starts[s] = number of tokens with key < s; slot_starts[S] = start of the base segment
    starts = np.searchsorted(key[order], np.arange(num_slots + 1), side="left")  # [S + 1]
    slot_starts[:] = starts
    g = tile_slots.shape[0]
    if g == 0:
        return
    ends = np.append(starts[1:], t)  # [S + 1]
    seg_tiles = (ends - starts + block_m - 1) // block_m  # [S + 1]
    tile_cum = np.cumsum(seg_tiles)  # [S + 1], inclusive
    ids = np.arange(g)
    seg = np.searchsorted(tile_cum, ids, side="right")  # [G], segment of tile j (S + 1: none)
    valid = seg <= num_slots
    seg_c = np.minimum(seg, num_slots)
    start = starts[seg_c] + (ids - (tile_cum[seg_c] - seg_tiles[seg_c])) * block_m
    tile_slots[:] = np.where(valid, np.where(seg_c == num_slots, BASE_TILE, seg_c), EMPTY_TILE)
    tile_starts[:] = np.where(valid, start, 0)
    tile_ends[:] = np.where(valid, np.minimum(start + block_m, ends[seg_c]), 0)


def build_mapping(token_slots: torch.Tensor, num_slots: int) -> LoraMapping:
    """One-off mapping in fresh buffers on `token_slots`' device (tests, benchmarks).
    token_slots: [T] int tensor."""
    buffers = LoraMappingBuffers(max(1, token_slots.shape[0]), num_slots, token_slots.device)
    return buffers.update(token_slots)
