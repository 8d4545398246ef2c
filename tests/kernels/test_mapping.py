"""LoraMapping: segments and the kernels' tile list, against a plain-Python model of them."""

import pytest
import torch

from loraplex.kernels.mapping import (
    BASE_TILE,
    EMPTY_TILE,
    SHORT_SEGMENT,
    LoraMapping,
    LoraMappingBuffers,
    block_m_for,
    build_mapping,
    num_tiles_bound,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def check_mapping(m: LoraMapping, token_slots: list[int], num_slots: int) -> None:
    t = len(token_slots)
    assert m.num_tokens == t and m.num_slots == num_slots
    assert m.any_adapter == any(s >= 0 for s in token_slots)
    key = [s if s >= 0 else num_slots for s in token_slots]
    want_sorted = sorted(range(t), key=lambda i: (key[i], i))  # stable by slot, base last
    assert m.sorted_tokens.tolist() == want_sorted
    starts = [sum(1 for k in key if k < s) for s in range(num_slots + 1)]
    assert m.slot_starts.tolist() == starts

    bm, tile_slots, tile_starts, tile_ends = (x.tolist() if torch.is_tensor(x) else x for x in m.tiles())
    assert bm == block_m_for(t)
    assert len(tile_slots) == num_tiles_bound(t, num_slots, bm) <= max(t, 0)
    covered = []
    for slot, lo, hi in zip(tile_slots, tile_starts, tile_ends):
        if slot == EMPTY_TILE:
            assert lo == hi
            continue
        assert 0 < hi - lo <= bm
        for pos in range(lo, hi):
            tok = want_sorted[pos]
            assert token_slots[tok] < 0 if slot == BASE_TILE else token_slots[tok] == slot
        covered += range(lo, hi)
    assert covered == list(range(t))  # every token in exactly one tile, in sorted order
    live = [s != EMPTY_TILE for s in tile_slots]
    assert live == sorted(live, reverse=True)  # empty entries only at the end
    check_slot_groups(m, token_slots, num_slots)


def check_slot_groups(m: LoraMapping, token_slots: list[int], num_slots: int) -> None:
    """The torch ops' grouping: every adapter token once, by slot in token order; short
    segments padded into one batch, longer ones alone; base tokens nowhere."""
    tokens_of = {s: [i for i, k in enumerate(token_slots) if k == s] for s in range(num_slots)}
    short = {s: toks for s, toks in tokens_of.items() if 0 < len(toks) <= SHORT_SEGMENT}
    g = m.slot_groups()
    assert g is m.slot_groups()  # built once per step
    assert g.slots.tolist() == sorted(short)
    width = max(map(len, short.values()), default=0)
    assert g.tokens.shape == g.valid.shape == (len(short), width)
    for d, s in enumerate(sorted(short)):
        n = len(short[s])
        assert g.tokens[d, :n].tolist() == short[s] and g.valid[d].tolist() == [True] * n + [False] * (width - n)
        assert set(g.tokens[d].tolist()) == set(short[s])  # padding repeats one of its own tokens
    assert g.rows.tolist() == [t for s in sorted(short) for t in short[s]]
    assert [(s, t.tolist()) for s, t in g.long] == [(s, toks) for s, toks in tokens_of.items() if len(toks) > SHORT_SEGMENT]


@pytest.mark.parametrize(
    "token_slots,num_slots",
    [
        ([2, -1, 0, 2, 2, -1, 0, 3], 5),  # mixed, empty segments (slots 1 and 4)
        ([-1, -1, -1], 4),  # all base
        ([3] * 40, 4),  # one long segment over several tiles
        (list(range(7)), 7),  # all distinct
        ([0], 1),
        ([], 3),
    ],
)
def test_build_mapping(token_slots, num_slots):
    m = build_mapping(torch.tensor(token_slots, dtype=torch.int32, device=DEVICE), num_slots)
    check_mapping(m, token_slots, num_slots)


def test_random_mappings_and_prefill_tiles():
    gen = torch.Generator().manual_seed(0)
    for t, s in [(1, 9), (33, 4), (100, 200), (300, 5), (700, 3)]:  # > 256 tokens: 64-token tiles
        slots = (torch.randint(-1, s, (t,), generator=gen, dtype=torch.int32)).tolist()
        check_mapping(build_mapping(torch.tensor(slots, dtype=torch.int32, device=DEVICE), s), slots, s)


def test_buffers_rewrite_in_place():
    buffers = LoraMappingBuffers(64, 6, DEVICE)
    first = buffers.update(torch.tensor([5, 5, -1, 0] * 8, dtype=torch.int32, device=DEVICE))

    def ptrs(m):
        return [x.data_ptr() for x in (m.token_slots, m.sorted_tokens, m.slot_starts, m.tile_slots, m.tile_starts)]

    before = ptrs(first)
    new = [1, -1, 4, 4, 2, 0] * 5 + [3, 3]
    second = buffers.update(torch.tensor(new, dtype=torch.int32))  # host tensor into device buffers
    assert ptrs(second) == before
    check_mapping(second, new, 6)
    check_mapping(buffers.update(torch.tensor([2, -1, 2], dtype=torch.int32)), [2, -1, 2], 6)
    with pytest.raises(ValueError):
        buffers.update(torch.zeros(65, dtype=torch.int32))


def test_hand_made_mapping_builds_tiles():
    ref = build_mapping(torch.tensor([1, -1, 1, 0], dtype=torch.int32), 3)
    bare = LoraMapping(ref.token_slots, ref.sorted_tokens, ref.slot_starts, 3, True)
    check_mapping(bare, [1, -1, 1, 0], 3)


def test_staging_a_mapping_runs_no_tensor_op():
    """The build is numpy on the host: staging and taking the views launch nothing (the
    step context's one copy moves the mapping with the rest of the step)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    buffers = LoraMappingBuffers(256, 32, DEVICE)
    slots = torch.randint(-1, 32, (200,), dtype=torch.int32).tolist()
    with Ops() as ops:
        buffers.stage(slots)
        m = buffers.views(len(slots), any_adapter=True)
    assert {name.split(".")[0] for name in ops.names} <= {"slice"}  # views of the buffers only
    buffers.update(slots)
    check_mapping(m, slots, 32)
