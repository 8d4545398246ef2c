"""Adapters on the device: rank pages, their free lists and shared factors, and the
staging form an adapter is copied to the device from.

`StagedAdapter` is an adapter in the one form laid out for one model: every adapted
slice's A and Bᵀ cut into whole rank pages, and its vectors, in ONE flat host buffer of
the serving dtype (pinned on CUDA) plus one small float32 buffer (scales, VeRA's λ_d).
A load is then one host→device copy of each buffer and one scatter per slice.

`AdapterPages` keeps the books of every adapter layer's page pools (which pages are
free, which factors sit where, which slots read them) and writes the layers' tensors
through their narrow interface (`AdapterLinear.write_pages / write_slot / reset_slot`).
Its bookkeeping (`fits`, `assign`, `release`) runs on the engine thread only; `apply`,
which does the tensor writes of one `assign`, may run on any thread (the loader's, on a
side stream on CUDA), since it touches only pages and a slot that no running request
reads. It knows nothing of LRU, pins, budgets or versions (device_adapters.py,
adapter_manager.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

import torch

from loraplex.adapters.form import AdapterWeights, ModuleDelta
from loraplex.kernels.rank_pages import RANK_PAGE, pages_for
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
    """One adapted slice of a staged adapter; spans index StagedAdapter.data / .fdata."""

    group: int  # index in the model's adapter_groups() order
    slice: int  # slice of the group (q, k or v of q|k|v)
    rank: int
    shared_key: Hashable | None  # equal keys: equal factors, stored once on the device
    a: Span  # [pages, 16, in] in data
    bt: Span  # [pages, 16, out_i] in data
    scale: int  # index of s in fdata
    g: Span | None = None  # [out_i] in data
    out_scale: Span | None = None  # [out_i] in data
    rank_scale: Span | None = None  # [rank] in fdata

    @property
    def pages(self) -> int:
        return pages_for(self.rank)


@dataclass(frozen=True)
class StagedAdapter:
    """An adapter ready to copy to the device (module docstring)."""

    weights: AdapterWeights  # what it was staged from (metadata; its tensors are not used on the device path)
    parts: tuple[StagedPart, ...]
    data: torch.Tensor  # [N] serving dtype, pinned on CUDA
    fdata: torch.Tensor  # [M] float32, pinned on CUDA

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.fdata.numel() * 4

    @classmethod
    def build(cls, weights: AdapterWeights, layout: list[tuple[int, tuple[str, ...]]], dtype: torch.dtype,
              *, pin: bool = False, fold_shared: bool = False) -> "StagedAdapter":  # fmt: skip
        """layout: (layer, slice names) per adapter group, in the model's order.
        fold_shared: store shared factors (VeRA) per adapter, with d and o folded in."""
        chunks: list[torch.Tensor] = []
        fchunks: list[torch.Tensor] = []
        sizes = [0, 0]  # elements so far in data, fdata

        def put(t: torch.Tensor, into: int) -> Span:
            start = sizes[into]
            (chunks if into == 0 else fchunks).append(t.reshape(-1))
            sizes[into] += t.numel()
            return start, sizes[into]

        parts = []
        for gi, (layer, names) in enumerate(layout):
            for si, name in enumerate(names):
                d: ModuleDelta | None = weights.modules.get((layer, name))
                if d is None or d.rank == 0:
                    continue
                if fold_shared and d.shared_key is not None:
                    d = d.folded()
                rows = pages_for(d.rank) * RANK_PAGE
                a = torch.zeros(rows, d.a.shape[1], dtype=dtype)
                a[: d.rank] = d.a
                bt = torch.zeros(rows, d.b.shape[0], dtype=dtype)
                bt[: d.rank] = d.b.t()
                parts.append(StagedPart(
                    gi, si, d.rank, d.shared_key, put(a, 0), put(bt, 0),
                    scale=put(torch.tensor([d.scale], dtype=torch.float32), 1)[0],
                    g=put(d.g.to(dtype), 0) if d.g is not None else None,
                    out_scale=put(d.out_scale.to(dtype), 0) if d.out_scale is not None else None,
                    rank_scale=put(d.rank_scale.float(), 1) if d.rank_scale is not None else None,
                ))  # fmt: skip
        data = torch.empty(sizes[0], dtype=dtype, pin_memory=pin)
        fdata = torch.empty(sizes[1], dtype=torch.float32, pin_memory=pin)
        torch.cat(chunks, out=data) if chunks else None
        torch.cat(fchunks, out=fdata) if fchunks else None
        return cls(weights, tuple(parts), data, fdata)


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
        for group in self.groups:
            group.allocate(num_slots, pages_for(max_rank), num_pages)
        model.num_slots = num_slots
        n = [len(g.names) for g in self.groups]
        self._free = [[PageFreeList(num_pages) for _ in range(k)] for k in n]  # [group][slice]
        self._factors: list[list[dict[Hashable, _Factors]]] = [[{} for _ in range(k)] for k in n]
        self._key_of: list[list[dict[int, Hashable]]] = [[{} for _ in range(k)] for k in n]  # [group][slice] slot -> key

    def stage(self, weights: AdapterWeights, *, fold_shared: bool = False) -> StagedAdapter:
        dtype = self.groups[0].dtype
        return StagedAdapter.build(weights, self.layout, dtype, pin=self.device.type == "cuda", fold_shared=fold_shared)

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
        limit = pages_for(self.max_rank) * RANK_PAGE  # rank rows a slot's page-table row holds
        for p in staged.parts:
            if p.rank > limit:
                raise ValueError(f"{self.groups[p.group].names[p.slice]}: rank {p.rank} exceeds the pool's max rank {limit}")
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
        two copies (non-blocking from pinned memory), then one scatter per slice."""
        staged, dev = plan.staged, self.device
        data = staged.data.to(dev, non_blocking=True)
        fdata = staged.fdata.to(dev, non_blocking=True)
        flat = [p for ids in plan.page_ids for p in ids]
        ids_all = torch.tensor(flat, dtype=torch.int32, pin_memory=dev.type == "cuda").to(dev, non_blocking=True)
        for group in self.groups:
            group.reset_slot(plan.slot)
        at = 0
        for p, ids, fresh in zip(staged.parts, plan.page_ids, plan.write_factors):
            group = self.groups[p.group]
            page_ids = ids_all[at : at + len(ids)]  # [pages] int32
            at += len(ids)
            if fresh:
                n, width = p.pages, group.widths[p.slice]
                group.write_pages(p.slice, page_ids.long(), data[slice(*p.a)].view(n, RANK_PAGE, -1), data[slice(*p.bt)].view(n, RANK_PAGE, width))
            group.write_slot(
                p.slice, plan.slot, page_ids, p.rank, fdata[p.scale],
                g=data[slice(*p.g)] if p.g else None,
                rank_scale=fdata[slice(*p.rank_scale)] if p.rank_scale else None,
                out_scale=data[slice(*p.out_scale)] if p.out_scale else None,
            )  # fmt: skip

    def write(self, slot: int, weights: AdapterWeights | StagedAdapter) -> None:
        """assign + apply at once, for tools and tests that place adapters by hand."""
        staged = weights if isinstance(weights, StagedAdapter) else self.stage(weights)
        self.release(slot)
        self.apply(self.assign(slot, staged))
