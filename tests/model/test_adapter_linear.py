"""AdapterLinear's rank-paged storage under churn: adapters of random ranks loaded into
and cleared from slots in random order (so pages fragment and an adapter's pages stop
being consecutive), the output checked against dense math after every operation, with
the torch ops and with the Triton kernels (the interpreter on CPU)."""

import pytest
import torch

from loraplex.adapters.form import ModuleDelta
from loraplex.kernels.backend import lora_ops
from loraplex.kernels.mapping import build_mapping
from loraplex.kernels.rank_pages import pages_for
from loraplex.server.model.adapter_linear import AdapterLinear
from loraplex.server.model.linear import DenseLinear
from loraplex.server.model.page_free_list import PageFreeList

IN, WIDTHS, SLOTS, MAX_RANK, PAGES = 24, (20, 12, 12), 5, 40, 7  # 7 pages: 5 slots of rank > 16 do not fit


def make_layer(gen):
    bases = [DenseLinear(torch.randn(w, IN, generator=gen), torch.float32) for w in WIDTHS]
    return AdapterLinear(["q", "k", "v"], bases, [None, torch.randn(12, generator=gen), None], IN, SLOTS, MAX_RANK, PAGES, torch.float32, torch.device("cpu"))


def random_deltas(gen, dora):
    deltas = []
    for w in WIDTHS:
        if torch.rand(1, generator=gen).item() < 0.2:
            deltas.append(None)  # slice not adapted
            continue
        r = int(torch.randint(1, MAX_RANK + 1, (1,), generator=gen))
        g = torch.rand(w, generator=gen) + 0.5 if dora else None
        deltas.append(ModuleDelta(torch.randn(r, IN, generator=gen), torch.randn(w, r, generator=gen), float(torch.rand(1, generator=gen)), g))
    return deltas


def dense_forward(layer, x, slots, resident):
    """Per token: y_i = g ⊙ (W_i x + s · B (A x)) + bias, from the deltas as loaded."""
    y = torch.cat([b(x) for b in layer.bases], dim=-1)  # [T, sum out]
    for tok, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        col = 0
        for w, d in zip(WIDTHS, resident[s]):
            if d is not None:
                v = y[tok, col : col + w] + d.scale * (d.b @ (d.a @ x[tok]))
                y[tok, col : col + w] = v * d.g if d.g is not None else v
            col += w
    return y + layer.bias


def fixed_deltas(gen, rank):
    return [ModuleDelta(torch.randn(rank, IN, generator=gen), torch.randn(w, rank, generator=gen), 0.5) for w in WIDTHS]


# (slot, rank) loads and (slot, None) clears that leave free pages [0, 2] only, then ask
# for 2 pages (scattered: [0, 2]) and then for more pages than are free (refused)
SCRIPT = [(0, 16), (1, 16), (2, 16), (3, 48), (4, 16), (0, None), (2, None), (0, 32), (2, 17)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_churn_matches_dense_math_and_frees_every_page(backend):
    gen = torch.Generator().manual_seed(3)
    layer, ops = make_layer(gen), lora_ops("cpu", backend)
    resident = {}
    refused = fragmented = 0
    script = [(slot, fixed_deltas(gen, r) if r else None) for slot, r in SCRIPT]
    steps = 30 if backend == "torch" else 6
    for step in range(len(script) + steps):
        if step < len(script):
            slot, deltas = script[step]
        else:
            slot = int(torch.randint(0, SLOTS, (1,), generator=gen))
            deltas = None if slot in resident and torch.rand(1, generator=gen).item() < 0.4 else random_deltas(gen, dora=step % 3 == 0)
        if deltas is None:
            layer.clear(slot)
            resident.pop(slot, None)
        else:
            need = layer.pages_needed(deltas)
            if any(n > f + h for n, f, h in zip(need, layer.free_pages(), layer.pages_held(slot))):
                with pytest.raises(ValueError, match="not enough free rank pages"):
                    layer.load(slot, deltas)
                resident.pop(slot, None)  # a failed load leaves the slot empty
                assert layer.pages_held(slot) == [0, 0, 0]
                refused += 1
                continue
            layer.load(slot, deltas)
            resident[slot] = deltas
            ids = [held.get(slot, []) for held in layer._pages_of]
            fragmented += any(p != list(range(p[0], p[0] + len(p))) for p in ids if p)
        held = [sum(len(layer._pages_of[i].get(s, ())) for s in resident) for i in range(3)]
        assert [PAGES - f for f in layer.free_pages()] == held  # no page leaked or shared
        x = torch.randn(11, IN, generator=gen)
        slots = torch.tensor((list(resident) + [-1]) * 11, dtype=torch.int32)[:11]
        got = layer(x, build_mapping(slots, SLOTS), ops)
        torch.testing.assert_close(got, dense_forward(layer, x, slots, resident), atol=1e-4, rtol=1e-4)
    assert fragmented and refused  # the churn reached scattered pages and a full pool
    for slot in list(resident):
        layer.clear(slot)
    assert layer.free_pages() == [PAGES] * 3


def test_small_ranks_take_one_page_each():
    layer = make_layer(torch.Generator().manual_seed(0))
    d = [ModuleDelta(torch.randn(r, IN), torch.randn(w, r), 1.0) for r, w in zip((1, 16, 17), WIDTHS)]
    assert layer.pages_needed(d) == [1, 1, 2]
    layer.load(2, d)
    assert layer.free_pages() == [PAGES - 1, PAGES - 1, PAGES - 2] and layer.pages_held(2) == [1, 1, 2]
    assert layer.ranks[:, 2].tolist() == [1, 16, 17]


def test_pool_too_small_for_max_rank_is_refused():
    with pytest.raises(ValueError, match="cannot hold one adapter of rank 40"):
        AdapterLinear(["o"], [DenseLinear(torch.randn(8, IN), torch.float32)], [None], IN, 2, 40, pages_for(40) - 1, torch.float32, torch.device("cpu"))


def test_free_list_prefers_a_consecutive_run():
    f = PageFreeList(8)
    a, b, c = f.take(2), f.take(3), f.take(2)
    assert (a, b, c) == ([0, 1], [2, 3, 4], [5, 6])
    f.give(a)
    f.give([5])
    assert f.take(2) == [0, 1]  # the lowest run
    assert f.take(2) == [5, 7]  # no run of 2 left: the lowest pages
    with pytest.raises(ValueError, match="2 rank pages wanted, 0 of 8 free"):
        f.take(2)
    with pytest.raises(AssertionError, match="freed twice"):
        f.give([3, 3])
