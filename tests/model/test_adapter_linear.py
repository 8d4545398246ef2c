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
                v = y[tok, col : col + w] + d.dense() @ x[tok]
                y[tok, col : col + w] = v * d.g if d.g is not None else v
            col += w
    return y + layer.bias if layer.bias is not None else y


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
            if not layer.fits(deltas, {slot}):
                with pytest.raises(ValueError, match="not enough free rank pages"):
                    layer.load(slot, deltas)
                resident.pop(slot, None)  # a failed load leaves the slot empty
                assert all(slot not in keys for keys in layer._key_of)
                refused += 1
                continue
            layer.load(slot, deltas)
            resident[slot] = deltas
            ids = [layer._factors[i][key].pages for i, key in enumerate(k.get(slot) for k in layer._key_of) if key is not None]
            fragmented += any(p != list(range(p[0], p[0] + len(p))) for p in ids if p)
        held = [sum(len(f.pages) for f in layer._factors[i].values()) for i in range(3)]
        assert [PAGES - f for f in layer.free_pages()] == held  # no page leaked
        assert sorted(p for f in layer._factors[0].values() for p in f.pages) == sorted(set(p for f in layer._factors[0].values() for p in f.pages))
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
    layer.load(2, d)
    assert layer.free_pages() == [PAGES - 1, PAGES - 1, PAGES - 2]
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


def vera_like(gen, shared_a, shared_b, key):
    """Deltas that share A and B (per slice) under `key`, with their own d and o."""
    return [ModuleDelta(a, b, 1.0, rank_scale=torch.randn(a.shape[0], generator=gen), out_scale=torch.randn(b.shape[0], generator=gen),
                        shared_key=(key, i)) for i, (a, b) in enumerate(zip(shared_a, shared_b))]  # fmt: skip


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_shared_factors_are_stored_once(backend, fold):
    gen = torch.Generator().manual_seed(7)
    bases = [DenseLinear(torch.randn(w, IN, generator=gen), torch.float32) for w in WIDTHS]
    layer = AdapterLinear(["q", "k", "v"], bases, [None] * 3, IN, SLOTS, MAX_RANK, 12, torch.float32, torch.device("cpu"), fold_shared=fold)
    shared_a = [torch.randn(33, IN, generator=gen) for _ in WIDTHS]  # rank 33: 3 pages
    shared_b = [torch.randn(w, 33, generator=gen) for w in WIDTHS]
    resident = {0: vera_like(gen, shared_a, shared_b, "p"), 1: vera_like(gen, shared_a, shared_b, "p"), 2: random_deltas(gen, dora=True)}
    resident[2] = [d or ModuleDelta(torch.randn(3, IN, generator=gen), torch.randn(w, 3, generator=gen), 1.0) for d, w in zip(resident[2], WIDTHS)]
    for slot, deltas in resident.items():
        layer.load(slot, deltas)
    own = [12 - f for f in layer.free_pages()]  # pages of the LoRA/DoRA slot + the VeRA factors
    lora_pages = [pages_for(d.rank) for d in resident[2]]
    assert own == [lp + (6 if fold else 3) for lp in lora_pages]  # shared: one copy for two adapters
    x = torch.randn(9, IN, generator=gen)
    slots = torch.tensor([0, 1, 2, -1, 1, 0, 2, 1, 0], dtype=torch.int32)
    got = layer(x, build_mapping(slots, SLOTS), lora_ops("cpu", backend))
    y = torch.cat([b(x) for b in bases], dim=-1)
    torch.testing.assert_close(got, dense_forward(layer, x, slots, resident), atol=1e-4, rtol=1e-4)
    assert not torch.equal(got[0], got[1]) and not torch.equal(got, y)
    # shared factors go with their last holder; folded ones with their own slot
    layer.clear(0)
    assert [12 - f for f in layer.free_pages()] == [o - (3 if fold else 0) for o in own]
    layer.clear(1)
    assert [12 - f for f in layer.free_pages()] == lora_pages


def test_fits_counts_shared_factors_freed_only_with_their_last_holder():
    gen = torch.Generator().manual_seed(1)
    bases = [DenseLinear(torch.randn(8, IN, generator=gen), torch.float32)]
    layer = AdapterLinear(["o"], bases, [None], IN, 4, 32, 4, torch.float32, torch.device("cpu"))
    a, b = torch.randn(32, IN, generator=gen), torch.randn(8, 32, generator=gen)
    layer.load(0, vera_like(gen, [a], [b], "p"))  # 2 pages, shared
    layer.load(1, vera_like(gen, [a], [b], "p"))  # no more pages
    layer.load(2, [ModuleDelta(torch.randn(20, IN), torch.randn(8, 20), 1.0)])  # 2 pages: the pool is full
    assert layer.free_pages() == [0]
    big = [ModuleDelta(torch.randn(32, IN), torch.randn(8, 32), 1.0)]
    same_projection = vera_like(gen, [a], [b], "p")
    assert layer.fits(same_projection, set())  # its factors are resident: costs nothing
    assert not layer.fits(big, {0}) and not layer.fits(big, {1})  # one holder gone: still held
    assert layer.fits(big, {0, 1}) and layer.fits(big, {2})
