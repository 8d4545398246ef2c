"""AdapterPages (the manager's books of the rank pages) and AdapterLinear's tensors under
churn: adapters of random ranks written into and released from slots in random order (so
pages fragment and an adapter's pages stop being consecutive), the output checked
against dense math after every operation, with the torch ops and with the Triton
kernels (the interpreter on CPU)."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from loraplex.adapters.form import AdapterWeights, ModuleDelta
from loraplex.kernels.backend import lora_ops
from loraplex.kernels.mapping import build_mapping
from loraplex.kernels.rank_pages import pages_for
from loraplex.server.engine.adapter_pages import AdapterPages
from loraplex.server.engine.page_free_list import PageFreeList
from loraplex.server.model.adapter_linear import AdapterLinear
from loraplex.server.model.linear import DenseLinear

IN, WIDTHS, SLOTS, MAX_RANK, PAGES = 24, (20, 12, 12), 5, 40, 7  # 7 pages: 5 slots of rank > 16 do not fit


class OneGroup:
    """A model of one adapter layer, as AdapterPages sees a LlamaModel."""

    device = torch.device("cpu")

    def __init__(self, layer: AdapterLinear):
        self.layer = layer

    def adapter_groups(self):
        yield 0, self.layer


def make_group(gen, names=("q", "k", "v"), widths=WIDTHS, biases=None, slots=SLOTS, max_rank=MAX_RANK, pages=PAGES):
    """(layer, its AdapterPages)."""
    base = DenseLinear.stack([torch.randn(w, IN, generator=gen) for w in widths], torch.float32)
    layer = AdapterLinear(list(names), base, biases or [None] * len(widths), IN, torch.float32, torch.device("cpu"))
    return layer, AdapterPages(OneGroup(layer), slots, max_rank, pages)


def make_layer(gen):
    return make_group(gen, biases=[None, torch.randn(12, generator=gen), None])


def run(layer, x, slots, ops):
    """The layer's forward with a step context that holds only the mapping (all it reads)."""
    layer.step, layer.ops = SimpleNamespace(mapping=build_mapping(slots, layer.num_slots)), ops
    return layer(x)


def adapter(deltas, names=("q", "k", "v")) -> AdapterWeights:
    return AdapterWeights("lora", {(0, n): d for n, d in zip(names, deltas) if d is not None})


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
    y = layer.base(x)  # [T, sum out]
    for tok, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        col = 0
        for w, d in zip(layer.widths, resident[s]):
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
    (layer, pages), ops = make_layer(gen), lora_ops("cpu", backend)
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
            pages.release(slot)
            resident.pop(slot, None)
        else:
            staged = pages.stage(adapter(deltas))
            if not pages.fits(staged, {slot}):
                with pytest.raises(ValueError, match="not enough free rank pages"):
                    pages.write(slot, staged)
                resident.pop(slot, None)  # a failed load leaves the slot empty
                assert all(slot not in keys for keys in pages._key_of[0])
                refused += 1
                continue
            pages.write(slot, staged)
            resident[slot] = deltas
            factors, key_of = pages._factors[0], pages._key_of[0]
            ids = [factors[i][key].pages for i, key in enumerate(k.get(slot) for k in key_of) if key is not None]
            fragmented += any(p != list(range(p[0], p[0] + len(p))) for p in ids if p)
        factors = pages._factors[0]
        held = [sum(len(f.pages) for f in factors[i].values()) for i in range(3)]
        assert [PAGES - f for f in pages.pages_free()] == held  # no page leaked
        assert sorted(p for f in factors[0].values() for p in f.pages) == sorted(set(p for f in factors[0].values() for p in f.pages))
        x = torch.randn(11, IN, generator=gen)
        slots = torch.tensor((list(resident) + [-1]) * 11, dtype=torch.int32)[:11]
        got = run(layer, x, slots, ops)
        torch.testing.assert_close(got, dense_forward(layer, x, slots, resident), atol=1e-4, rtol=1e-4)
    assert fragmented and refused  # the churn reached scattered pages and a full pool
    for slot in list(resident):
        pages.release(slot)
    assert pages.pages_free() == [PAGES] * 3


def test_small_ranks_take_one_page_each():
    layer, pages = make_layer(torch.Generator().manual_seed(0))
    d = [ModuleDelta(torch.randn(r, IN), torch.randn(w, r), 1.0) for r, w in zip((1, 16, 17), WIDTHS)]
    pages.write(2, adapter(d))
    assert pages.pages_free() == [PAGES - 1, PAGES - 1, PAGES - 2]
    assert layer.ranks[:, 2].tolist() == [1, 16, 17]


def test_a_staged_adapter_is_one_buffer_of_whole_pages():
    layer, pages = make_layer(torch.Generator().manual_seed(0))
    d = [ModuleDelta(torch.randn(r, IN), torch.randn(w, r), 1.0) for r, w in zip((1, 16, 17), WIDTHS)]
    staged = pages.stage(adapter(d))
    rows = 16 + 16 + 32  # each slice's rank rounded up to whole pages of 16 rows
    assert staged.data.numel() == rows * IN + sum(16 * ((r + 15) // 16) * w for r, w in zip((1, 16, 17), WIDTHS))
    assert staged.nbytes == staged.data.numel() * 4 + staged.fdata.numel() * 4 and len(staged.parts) == 3


def test_pool_too_small_for_max_rank_is_refused():
    with pytest.raises(ValueError, match="cannot hold one adapter of rank 40"):
        make_group(torch.Generator(), names=["o"], widths=[8], slots=2, max_rank=40, pages=pages_for(40) - 1)


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
    layer, pages = make_group(gen, pages=12)
    base = layer.base
    shared_a = [torch.randn(33, IN, generator=gen) for _ in WIDTHS]  # rank 33: 3 pages
    shared_b = [torch.randn(w, 33, generator=gen) for w in WIDTHS]
    resident = {0: vera_like(gen, shared_a, shared_b, "p"), 1: vera_like(gen, shared_a, shared_b, "p"), 2: random_deltas(gen, dora=True)}
    resident[2] = [d or ModuleDelta(torch.randn(3, IN, generator=gen), torch.randn(w, 3, generator=gen), 1.0) for d, w in zip(resident[2], WIDTHS)]
    for slot, deltas in resident.items():
        pages.write(slot, pages.stage(adapter(deltas), fold_shared=fold))
    own = [12 - f for f in pages.pages_free()]  # pages of the LoRA/DoRA slot + the VeRA factors
    lora_pages = [pages_for(d.rank) for d in resident[2]]
    assert own == [lp + (6 if fold else 3) for lp in lora_pages]  # shared: one copy for two adapters
    x = torch.randn(9, IN, generator=gen)
    slots = torch.tensor([0, 1, 2, -1, 1, 0, 2, 1, 0], dtype=torch.int32)
    got = run(layer, x, slots, lora_ops("cpu", backend))
    y = base(x)
    torch.testing.assert_close(got, dense_forward(layer, x, slots, resident), atol=1e-4, rtol=1e-4)
    assert not torch.equal(got[0], got[1]) and not torch.equal(got, y)
    # shared factors go with their last holder; folded ones with their own slot
    pages.release(0)
    assert [12 - f for f in pages.pages_free()] == [o - (3 if fold else 0) for o in own]
    pages.release(1)
    assert [12 - f for f in pages.pages_free()] == lora_pages


def test_fits_counts_shared_factors_freed_only_with_their_last_holder():
    gen = torch.Generator().manual_seed(1)
    layer, pages = make_group(gen, names=["o"], widths=[8], slots=4, max_rank=32, pages=4)
    one = lambda deltas: pages.stage(adapter(deltas, names=["o"]))  # noqa: E731
    a, b = torch.randn(32, IN, generator=gen), torch.randn(8, 32, generator=gen)
    pages.write(0, one(vera_like(gen, [a], [b], "p")))  # 2 pages, shared
    pages.write(1, one(vera_like(gen, [a], [b], "p")))  # no more pages
    pages.write(2, one([ModuleDelta(torch.randn(20, IN), torch.randn(8, 20), 1.0)]))  # 2 pages: the pool is full
    assert pages.pages_free() == [0]
    big = one([ModuleDelta(torch.randn(32, IN), torch.randn(8, 32), 1.0)])
    same_projection = one(vera_like(gen, [a], [b], "p"))
    assert pages.fits(same_projection, set())  # its factors are resident: costs nothing
    assert not pages.fits(big, {0}) and not pages.fits(big, {1})  # one holder gone: still held
    assert pages.fits(big, {0, 1}) and pages.fits(big, {2})


def test_a_width_whose_parts_are_partly_resident_writes_only_the_fresh_pages():
    gen = torch.Generator().manual_seed(5)
    layer, pages = make_group(gen, pages=12)  # k and v have one width (12): one block, one stack
    shared_a = [torch.randn(20, IN, generator=gen) for _ in WIDTHS]
    shared_b = [torch.randn(w, 20, generator=gen) for w in WIDTHS]
    first = vera_like(gen, shared_a, shared_b, "p")
    first[2] = None  # q and k: their factors become resident
    second = vera_like(gen, shared_a, shared_b, "p")  # k resident, v fresh: half of the width-12 block
    resident = {0: first, 1: second}
    for slot, deltas in resident.items():
        pages.write(slot, adapter(deltas))
    assert [12 - f for f in pages.pages_free()] == [2, 2, 2]  # every slice's factors once
    x = torch.randn(7, IN, generator=gen)
    slots = torch.tensor([0, 1, 1, -1, 0, 1, 0], dtype=torch.int32)
    got = run(layer, x, slots, lora_ops("cpu", "torch"))
    torch.testing.assert_close(got, dense_forward(layer, x, slots, resident), atol=1e-4, rtol=1e-4)


class Layers:
    """A model of `n` layers of three adapter groups (q|k|v, o, gate|up), as AdapterPages sees it."""

    device = torch.device("cpu")

    def __init__(self, n, gen):
        shapes = ((("q", "k", "v"), WIDTHS), (("o",), (IN,)), (("gate", "up"), (32, 32)))
        self.groups = [(i, AdapterLinear(list(names), DenseLinear.stack([torch.randn(w, IN, generator=gen) for w in widths], torch.float32),
                                         [None] * len(widths), IN, torch.float32, torch.device("cpu")))
                       for i in range(n) for names, widths in shapes]  # fmt: skip

    def adapter_groups(self):
        yield from self.groups


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not all(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns):
            self.ops.append(func._schema.name)  # views do not count
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dora", [False, True])
def test_one_adapter_write_is_the_same_few_ops_whatever_the_depth(dora):
    gen = torch.Generator().manual_seed(2)
    counts = []
    for n in (1, 6):
        model = Layers(n, gen)
        pages = AdapterPages(model, 3, 32)
        deltas = {(i, name): ModuleDelta(torch.randn(17, IN, generator=gen), torch.randn(g.widths[s], 17, generator=gen), 0.5,
                                         torch.rand(g.widths[s], generator=gen) + 0.5 if dora else None)
                  for i, g in model.groups for s, name in enumerate(g.names)}  # fmt: skip
        staged = pages.stage(AdapterWeights("dora" if dora else "lora", deltas))
        plan = pages.assign(1, staged)
        with OpCount() as rec:
            pages.apply(plan)
        counts.append(len(rec.ops))
        x = torch.randn(5, IN, generator=gen)
        for i, g in model.groups:  # every layer took its pages and slot rows
            slots = torch.tensor([1, -1, 1, 1, -1], dtype=torch.int32)
            want = dense_forward(g, x, slots, {1: [deltas[i, name] for name in g.names]})
            torch.testing.assert_close(run(g, x, slots, lora_ops("cpu", "torch")), want, atol=1e-4, rtol=1e-4)
    assert counts[0] == counts[1] <= 30, counts  # a few per width and kind, none per layer

