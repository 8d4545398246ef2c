"""Adapters on the device: rank pages, their free lists and shared factors, and the
staging form an adapter is copied to the device from.

`StagedAdapter` is an adapter in the one form laid out for one model: every adapted
slice's A and Bᵀ cut into whole rank pages, grouped by width, and its vectors, in ONE
flat host buffer of the serving dtype (pinned on CUDA) plus one small float32 buffer
(scales, λ_d). A load is then one host→device copy of each buffer and of the page ids,
and a few ops for the whole model (adapter_stacks.py), whatever its depth.

`AdapterPages` keeps the books of every adapter layer's page pools (which pages are
free, which factors sit where, which slots read them) and writes the layers' tensors,
which are views into its `AdapterStacks`. Its bookkeeping (`fits`, `assign`, `release`)
runs on the engine thread only; `apply`, which does the tensor writes of one `assign`,
may run on any thread (the writer's; on CUDA on a side stream), since it touches only
pages and a slot that no running request reads. It knows nothing of LRU, pins, budgets
or versions (device_adapters.py, adapter_manager.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

import torch

from loraplex.adapters.form import AdapterWeights, ModuleDelta
from loraplex.kernels.rank_pages import RANK_PAGE, pages_for
from loraplex.server.engine.adapter_stacks import AdapterStacks, SlotRows
from loraplex.server.engine.page_free_list import PageFreeList
from loraplex.server.model.config import ModelConfig
from loraplex.server.model.llama import GROUPS


def adapter_page_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """Device bytes of one rank page (16 rank rows of A [r, in] and Bᵀ [r, out]) in every
    target module of every layer: what the layers allocate per page of their pools."""
    size = torch.finfo(dtype).bits // 8
    per_layer = sum(RANK_PAGE * sum(config.module_shape(name)) * size for names in GROUPS for name in names)
    return per_layer * config.num_layers


def adapter_slot_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """Device bytes of one adapter slot's per-slot state over all layers: DoRA's g [out]
    and VeRA's λ_b [out] per target module (scales, ranks, λ_d and page-table rows are a
    few bytes more)."""
    size = torch.finfo(dtype).bits // 8
    per_layer = sum(2 * config.module_shape(name)[0] * size for names in GROUPS for name in names)
    return per_layer * config.num_layers


Span = tuple[int, int]  # [start, end) in a staging buffer


@dataclass(frozen=True)
class StagedPart:
    """One adapted slice of a staged adapter."""

    group: int  # index in the model's adapter_groups() order
    slice: int  # slice of the group (q, k or v of q|k|v)
    rank: int
    shared_key: Hashable | None  # equal keys: equal factors, stored once on the device
    a_row: int  # its first page in its width's A block of StagedAdapter.data ([pages, 16, in] there)
    bt_row: int  # its first page in its width's Bᵀ block
    g: bool = False  # has DoRA's g (a row of its width's g block)
    d: bool = False  # has d (a row of the d block)
    o: bool = False  # has o (a row of its width's o block)

    @property
    def pages(self) -> int:
        return pages_for(self.rank)


@dataclass(frozen=True)
class StagedAdapter:
    """An adapter ready to copy to the device (module docstring). `data` holds, in this
    order, per in-width the A pages of the parts of that width [pages, 16, w], per
    out-width their Bᵀ pages, then per out-width the g of the parts that have one
    [parts, w], and the same for o. `fdata` holds every slice's scale [K] (0: not
    adapted), then the d of the parts that have one [parts, R] (ones past each rank).
    Blocks are in part order."""

    weights: AdapterWeights  # what it was staged from (metadata; its tensors are not used on the device path)
    parts: tuple[StagedPart, ...]
    data: torch.Tensor  # [N] serving dtype, pinned on CUDA
    fdata: torch.Tensor  # [M] float32, pinned on CUDA
    a_blocks: dict[int, Span]  # in-width -> its A pages in data
    bt_blocks: dict[int, Span]  # out-width -> its Bᵀ pages in data
    g_blocks: dict[int, Span]  # out-width -> [parts with g, w] in data
    o_blocks: dict[int, Span]  # out-width -> [parts with o, w] in data
    d_block: Span | None  # [parts with d, R] in fdata

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.fdata.numel() * 4

    @classmethod
    def build(cls, weights: AdapterWeights, layout: list[tuple[int, tuple[str, ...]]], stacks: AdapterStacks, dtype: torch.dtype,
              *, pin: bool = False, fold_shared: bool = False) -> "StagedAdapter":  # fmt: skip
        """layout: (layer, slice names) per adapter group, in the model's order, placed in
        `stacks`. fold_shared: store shared factors (VeRA) per adapter, with d and o folded in."""
        K, R = stacks.num_slices, stacks.max_pages * RANK_PAGE
        a_rows: dict[int, list[torch.Tensor]] = {w: [] for w in stacks.a}  # in-width -> [pages * 16, w] per part
        bt_rows: dict[int, list[torch.Tensor]] = {w: [] for w in stacks.bt}
        n_a = dict.fromkeys(stacks.a, 0)  # pages so far per width
        n_bt = dict.fromkeys(stacks.bt, 0)
        g_rows: dict[int, list[torch.Tensor]] = {w: [] for w in stacks.g}  # out-width -> [w] per part with g
        o_rows: dict[int, list[torch.Tensor]] = {w: [] for w in stacks.o}
        d_rows: list[torch.Tensor] = []  # [R] per part with d
        scales = torch.zeros(K, dtype=torch.float32)
        parts = []
        for gi, (layer, names) in enumerate(layout):
            for si, name in enumerate(names):
                d: ModuleDelta | None = weights.modules.get((layer, name))
                if d is None or d.rank == 0:
                    continue
                if d.rank > R:
                    raise ValueError(f"layer {layer} {name}: rank {d.rank} exceeds the pool's max rank {R}")
                if fold_shared and d.shared_key is not None:
                    d = d.folded()
                spot = stacks.spots[gi][si]
                n = pages_for(d.rank)
                a = torch.zeros(n * RANK_PAGE, spot.in_width, dtype=dtype)
                a[: d.rank] = d.a
                bt = torch.zeros(n * RANK_PAGE, spot.out_width, dtype=dtype)
                bt[: d.rank] = d.b.t()
                a_rows[spot.in_width].append(a)
                bt_rows[spot.out_width].append(bt)
                scales[spot.k] = d.scale
                if d.g is not None:
                    g_rows[spot.out_width].append(d.g.to(dtype))
                if d.out_scale is not None:
                    o_rows[spot.out_width].append(d.out_scale.to(dtype))
                if d.rank_scale is not None:
                    row = torch.ones(R, dtype=torch.float32)
                    row[: d.rank] = d.rank_scale
                    d_rows.append(row)
                parts.append(StagedPart(gi, si, d.rank, d.shared_key, n_a[spot.in_width], n_bt[spot.out_width],
                                        g=d.g is not None, d=d.rank_scale is not None, o=d.out_scale is not None))  # fmt: skip
                n_a[spot.in_width] += n
                n_bt[spot.out_width] += n
        chunks: list[torch.Tensor] = []
        size = [0]

        def put(t: torch.Tensor) -> Span:
            chunks.append(t.reshape(-1))
            size[0] += t.numel()
            return size[0] - t.numel(), size[0]

        a_blocks = {w: put(torch.cat(rows)) for w, rows in a_rows.items() if rows}
        bt_blocks = {w: put(torch.cat(rows)) for w, rows in bt_rows.items() if rows}
        g_blocks = {w: put(torch.stack(rows)) for w, rows in g_rows.items() if rows}
        o_blocks = {w: put(torch.stack(rows)) for w, rows in o_rows.items() if rows}
        data = torch.empty(size[0], dtype=dtype, pin_memory=pin)
        torch.cat(chunks, out=data) if chunks else None
        fchunks = [scales] + ([torch.stack(d_rows).reshape(-1)] if d_rows else [])
        fdata = torch.empty(sum(t.numel() for t in fchunks), dtype=torch.float32, pin_memory=pin)
        torch.cat(fchunks, out=fdata)
        d_block = (K, K + len(d_rows) * R) if d_rows else None
        return cls(weights, tuple(parts), data, fdata, a_blocks, bt_blocks, g_blocks, o_blocks, d_block)


@dataclass
class _Factors:
    """One A/Bᵀ pair resident in a slice's pages."""

    pages: list[int]
    holders: set[int]  # slots that read it


@dataclass(frozen=True)
class WritePlan:
    """The tensor writes of one adapter into one slot (`AdapterPages.assign`)."""

    slot: int
    staged: StagedAdapter
    page_ids: tuple[tuple[int, ...], ...]  # per part: its pages in rank order
    write_factors: tuple[bool, ...]  # per part: False when its shared factors are already resident


class AdapterPages:
    def __init__(self, model, num_slots: int, max_rank: int, num_pages: int | None = None):
        """Allocates `num_pages` rank pages per target module (None: enough for every slot
        at max rank) and `num_slots` slots of up to `max_rank` in every adapter layer of
        `model` (LlamaModel)."""
        num_pages = num_slots * pages_for(max_rank) if num_pages is None else num_pages
        if num_pages < pages_for(max_rank):
            raise ValueError(f"{num_pages} rank pages cannot hold one adapter of rank {max_rank}")
        self.groups = [group for _, group in model.adapter_groups()]
        self.layout = [(layer, group.names) for layer, group in model.adapter_groups()]
        self.num_slots, self.max_rank, self.num_pages = num_slots, max_rank, num_pages
        self.device = model.device
        self.stacks = AdapterStacks(self.groups, num_slots, pages_for(max_rank), num_pages)
        model.num_slots = num_slots
        n = [len(g.names) for g in self.groups]
        self._free = [[PageFreeList(num_pages) for _ in range(k)] for k in n]  # [group][slice]
        self._factors: list[list[dict[Hashable, _Factors]]] = [[{} for _ in range(k)] for k in n]
        self._key_of: list[list[dict[int, Hashable]]] = [[{} for _ in range(k)] for k in n]  # [group][slice] slot -> key

    def stage(self, weights: AdapterWeights, *, fold_shared: bool = False) -> StagedAdapter:
        dtype = self.groups[0].dtype
        return StagedAdapter.build(weights, self.layout, self.stacks, dtype, pin=self.device.type == "cuda", fold_shared=fold_shared)

    # -- bookkeeping (engine thread) -------------------------------------------------------
    def pages_free(self) -> list[int]:
        """Free rank pages of every target module's pool."""
        return [f.free for fs in self._free for f in fs]

    def fits(self, staged: StagedAdapter, evicted: set[int]) -> bool:
        """Would `assign(_, staged)` find its pages once the slots `evicted` are released?
        Factors already resident under a part's shared key cost nothing."""
        for p in staged.parts:
            factors = self._factors[p.group][p.slice]
            if p.shared_key is not None and p.shared_key in factors:
                continue
            freed = sum(len(f.pages) for f in factors.values() if f.holders <= evicted)
            if p.pages > self._free[p.group][p.slice].free + freed:
                return False
        return True

    def assign(self, slot: int, staged: StagedAdapter) -> WritePlan:
        """Takes `slot`'s pages for `staged` (the slot must be released); ValueError if
        they are not free. The tensors are written by `apply`."""
        if any(slot in k for ks in self._key_of for k in ks):
            raise AssertionError(f"slot {slot} assigned while it holds an adapter")
        if not self.fits(staged, set()):
            raise ValueError(f"not enough free rank pages ({sum(self.pages_free())} free in all)")
        ids, fresh = [], []
        for p in staged.parts:
            key = p.shared_key if p.shared_key is not None else object()  # object(): this slot's own
            factors = self._factors[p.group][p.slice]
            f = factors.get(key)
            fresh.append(f is None)
            if f is None:
                f = factors[key] = _Factors(self._free[p.group][p.slice].take(p.pages), set())
            f.holders.add(slot)
            self._key_of[p.group][p.slice][slot] = key
            ids.append(tuple(f.pages))
        return WritePlan(slot, staged, tuple(ids), tuple(fresh))

    def release(self, slot: int) -> None:
        """Gives back `slot`'s pages (shared factors with their last holder). Its tensors
        stay as they are: no token reads the slot, and the next `apply` resets it."""
        for fs, factors, key_of in zip(self._free, self._factors, self._key_of):
            for i in range(len(fs)):
                key = key_of[i].pop(slot, None)
                if key is None:
                    continue
                f = factors[i][key]
                f.holders.discard(slot)
                if not f.holders:
                    fs[i].give(f.pages)
                    del factors[i][key]

    # -- tensor writes (any thread) -------------------------------------------------------
    def apply(self, plan: WritePlan) -> None:
        """Writes a plan's adapter into its slot: the staging buffers go to the device in
        two copies (non-blocking from pinned memory) and the indices in one, then the
        stacks take the pages and vectors in one index_copy per width and the slot's rows
        in one copy or fill per kind (AdapterStacks.write)."""
        staged, dev, stacks, slot = plan.staged, self.device, self.stacks, plan.slot
        K, MP, P, S = stacks.num_slices, stacks.max_pages, stacks.num_pages, stacks.num_slots
        table = [0] * (K * MP)  # the slot's page-table rows [K, MP]
        ranks = [0] * K
        index: dict[tuple[str, int], tuple[list[int], list[int]]] = {}  # (kind, width) -> (rows in the stack, rows in the block)

        def add(kind: str, width: int, dst, src) -> None:
            d, s = index.setdefault((kind, width), ([], []))
            d.extend(dst)
            s.extend(src)

        for p, ids, fresh in zip(staged.parts, plan.page_ids, plan.write_factors):
            spot = stacks.spots[p.group][p.slice]
            table[spot.k * MP : spot.k * MP + len(ids)] = ids
            ranks[spot.k] = p.rank
            if fresh:
                add("a", spot.in_width, (spot.a * P + i for i in ids), range(p.a_row, p.a_row + len(ids)))
                add("bt", spot.out_width, (spot.b * P + i for i in ids), range(p.bt_row, p.bt_row + len(ids)))
            for kind, has, width, row in (("g", p.g, spot.out_width, spot.b), ("o", p.o, spot.out_width, spot.b), ("d", p.d, 0, spot.k)):
                if has:
                    add(kind, width, (row * S + slot,), ())  # rows of [n, S, w] viewed as [n * S, w]
        ints = table + ranks
        spans = {}
        for key, (dst, src) in index.items():
            spans[key] = len(ints), len(dst)
            ints += dst + src
        host = torch.tensor(ints, dtype=torch.int32, pin_memory=dev.type == "cuda")
        data = staged.data.to(dev, non_blocking=True)
        fdata = staged.fdata.to(dev, non_blocking=True)
        ints32 = host.to(dev, non_blocking=True)
        ints64 = ints32.long()

        def pages(blocks: dict[int, Span], kind: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
            out = {}
            for w, (start, end) in blocks.items():
                at, n = spans.get((kind, w), (0, 0))
                if n == 0:
                    continue  # every part's factors of this width are resident already
                rows = data[start:end].view(-1, RANK_PAGE, w)  # [block pages, 16, w]
                if n < rows.shape[0]:
                    rows = rows.index_select(0, ints64[at + n : at + 2 * n])  # only the fresh parts' pages
                out[w] = ints64[at : at + n], rows
            return out

        def vectors(blocks: dict[int, Span], kind: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
            out = {}
            for w, (start, end) in blocks.items():
                at, n = spans[kind, w]
                out[w] = ints64[at : at + n], data[start:end].view(n, w)
            return out

        d = None
        if staged.d_block is not None:
            at, n = spans["d", 0]
            d = ints64[at : at + n], fdata[slice(*staged.d_block)].view(n, -1)
        rows = SlotRows(
            page_table=ints32[: K * MP].view(K, MP), ranks=ints32[K * MP : K * MP + K], scales=fdata[:K], d=d,
            g=vectors(staged.g_blocks, "g"), o=vectors(staged.o_blocks, "o"),
            a_pages=pages(staged.a_blocks, "a"), bt_pages=pages(staged.bt_blocks, "bt"),
        )  # fmt: skip
        stacks.write(slot, rows)
        dora = {p.group for p in staged.parts if p.g}
        scaled = {p.group for p in staged.parts if p.d or p.o}
        for gi, group in enumerate(self.groups):
            (group.dora_slots.add if gi in dora else group.dora_slots.discard)(slot)
            (group.scaled_slots.add if gi in scaled else group.scaled_slots.discard)(slot)

    def write(self, slot: int, weights: AdapterWeights | StagedAdapter) -> None:
        """assign + apply at once, for tools and tests that place adapters by hand."""
        staged = weights if isinstance(weights, StagedAdapter) else self.stage(weights)
        self.release(slot)
        self.apply(self.assign(slot, staged))
