"""A group of base linears that read the same input (q|k|v, gate|up, or one alone),
with the adapter storage of every slice, computed as

    y = concat_i(base_i(x))                       # [T, sum out_i], shared by all tokens
    t = d_i[slot] ⊙ shrink(x, A_i[slot])          # [n_slices, T, R]
    y = g_i[slot] ⊙ (y_i + s_i[slot] · o_i[slot] ⊙ (t_i B_i[slot]ᵀ))   (per slice, in place; slot -1 untouched)
    y += bias                                     # after g: PEFT's DoRA does not scale the bias

Adapters' A and Bᵀ live in rank pages (kernels/rank_pages.py): each slice has a pool of
`num_pages` pages and an adapter takes ceil(rank / 16) of them, so adapters of small
rank cost little beside large ones. Factors with the same `shared_key` (VeRA's frozen
projections) are stored once and read by every slot that holds them; a slot then costs
its vectors d and o only. Scales, ranks, page-table rows and the vectors g, d, o are per
slot. `load(slot, deltas)` and `clear(slot)` are the only writers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

import torch
from torch import nn

from loraplex.adapters.form import ModuleDelta
from loraplex.kernels.backend import LoraOps
from loraplex.kernels.mapping import LoraMapping
from loraplex.kernels.rank_pages import RANK_PAGE, pages_for, write_rows
from loraplex.server.model.page_free_list import PageFreeList


@dataclass
class _Factors:
    """One A/Bᵀ pair resident in a slice's pages."""

    pages: list[int]
    holders: set[int]  # slots that read it


class AdapterLinear(nn.Module):
    def __init__(
        self,
        names: Sequence[str],  # module names of the slices, e.g. ("q_proj", "k_proj", "v_proj")
        bases: Sequence[nn.Module],  # DenseLinear / NF4Linear, one per slice
        biases: Sequence[torch.Tensor | None],  # [out_i] or None
        in_features: int,
        num_slots: int,
        max_rank: int,
        num_pages: int,  # rank pages per slice (>= ceil(max_rank / 16))
        dtype: torch.dtype,
        device: torch.device,
        fold_shared: bool = False,  # store shared factors per adapter, with d and o folded in
    ):
        super().__init__()
        if num_pages < pages_for(max_rank):
            raise ValueError(f"{num_pages} rank pages cannot hold one adapter of rank {max_rank}")
        self.names = tuple(names)
        self.bases = nn.ModuleList(bases)
        self.in_features = in_features
        self.widths = [b.out_features for b in bases]
        self.dtype = dtype
        self.fold_shared = fold_shared
        n, mp = len(bases), pages_for(max_rank)
        bias_list = [b if b is not None else torch.zeros(w) for b, w in zip(biases, self.widths)]
        self.bias = torch.cat(bias_list).to(device=device, dtype=dtype) if any(b is not None for b in biases) else None  # [sum out]
        self.a_pages = [torch.zeros(num_pages, RANK_PAGE, in_features, dtype=dtype, device=device) for _ in bases]  # n × [P, 16, in]
        self.bt_pages = [torch.zeros(num_pages, RANK_PAGE, w, dtype=dtype, device=device) for w in self.widths]  # n × [P, 16, out_i]
        self.page_table = torch.zeros(n, num_slots, mp, dtype=torch.int32, device=device)  # [n, S, MP]
        self.scales = torch.zeros(n, num_slots, dtype=torch.float32, device=device)  # [n, S]
        self.ranks = torch.zeros(n, num_slots, dtype=torch.int32, device=device)  # [n, S]
        self.g_stacks = [torch.ones(num_slots, w, dtype=dtype, device=device) for w in self.widths]  # n × [S, out_i]
        self.out_scales = [torch.ones(num_slots, w, dtype=dtype, device=device) for w in self.widths]  # n × [S, out_i]
        self.rank_scales = torch.ones(n, num_slots, mp * RANK_PAGE, dtype=torch.float32, device=device)  # [n, S, R]
        self._dora_slots: set[int] = set()
        self._scaled_slots: set[int] = set()  # slots with d or o (VeRA)
        self._free = [PageFreeList(num_pages) for _ in bases]
        self._factors: list[dict[Hashable, _Factors]] = [{} for _ in bases]  # slice -> key -> pages
        self._key_of: list[dict[int, Hashable]] = [{} for _ in bases]  # slice -> slot -> key

    def page_bytes(self) -> int:
        """Device bytes of one rank page in every slice."""
        return sum(a[0].numel() * a.element_size() + b[0].numel() * b.element_size() for a, b in zip(self.a_pages, self.bt_pages))

    def free_pages(self) -> list[int]:
        """Free rank pages per slice."""
        return [f.free for f in self._free]

    def _stored(self, d: ModuleDelta | None) -> ModuleDelta | None:
        return d.folded() if d is not None and self.fold_shared and d.shared_key is not None else d

    def fits(self, deltas: Sequence[ModuleDelta | None], evicted: set[int]) -> bool:
        """Would `load(_, deltas)` find its pages once the slots `evicted` are cleared?
        Factors already resident under a delta's shared key cost nothing. (Asked again
        each step a request waits: it reads ranks and keys only, and folds nothing.)"""
        for i, d in enumerate(deltas):
            if d is None:
                continue
            key = None if self.fold_shared else d.shared_key  # folded factors are the slot's own
            if key is not None and key in self._factors[i]:
                continue
            freed = sum(len(f.pages) for f in self._factors[i].values() if f.holders <= evicted)
            if pages_for(d.rank) > self._free[i].free + freed:
                return False
        return True

    def load(self, slot: int, deltas: Sequence[ModuleDelta | None]) -> None:
        """Writes one adapter's deltas (one per slice, None = slice not adapted) into `slot`."""
        deltas = [self._stored(d) for d in deltas]
        max_rank = self.page_table.shape[2] * RANK_PAGE
        for i, d in enumerate(deltas):
            if d is not None and d.rank > max_rank:
                raise ValueError(f"{self.names[i]}: rank {d.rank} exceeds the pool's max rank {max_rank}")
        self.clear(slot)
        if not self.fits(deltas, set()):
            raise ValueError(f"{'|'.join(self.names)}: not enough free rank pages ({self.free_pages()} free per slice)")
        for i, d in enumerate(deltas):
            if d is None or d.rank == 0:
                continue
            key = d.shared_key if d.shared_key is not None else object()  # object(): this slot's own
            f = self._factors[i].get(key)
            if f is None:
                f = self._factors[i][key] = _Factors(self._free[i].take(pages_for(d.rank)), set())
                write_rows(self.a_pages[i], f.pages, d.a)  # [r, in]
                write_rows(self.bt_pages[i], f.pages, d.b.t())  # [r, out_i]
            f.holders.add(slot)
            self._key_of[i][slot] = key
            self.page_table[i, slot, : len(f.pages)] = torch.tensor(f.pages, dtype=torch.int32)
            self.scales[i, slot] = d.scale
            self.ranks[i, slot] = d.rank
            if d.g is not None:
                self.g_stacks[i][slot].copy_(d.g)
                self._dora_slots.add(slot)
            if d.rank_scale is not None or d.out_scale is not None:
                if d.rank_scale is not None:
                    self.rank_scales[i, slot, : d.rank].copy_(d.rank_scale)
                if d.out_scale is not None:
                    self.out_scales[i][slot].copy_(d.out_scale)
                self._scaled_slots.add(slot)

    def clear(self, slot: int) -> None:
        for i in range(len(self.bases)):
            key = self._key_of[i].pop(slot, None)
            if key is not None:
                f = self._factors[i][key]
                f.holders.discard(slot)
                if not f.holders:
                    self._free[i].give(f.pages)
                    del self._factors[i][key]
            self.g_stacks[i][slot].fill_(1.0)
            self.out_scales[i][slot].fill_(1.0)
        self.rank_scales[:, slot] = 1.0
        self.page_table[:, slot] = 0
        self.scales[:, slot] = 0.0
        self.ranks[:, slot] = 0
        self._dora_slots.discard(slot)
        self._scaled_slots.discard(slot)

    def forward(self, x: torch.Tensor, mapping: LoraMapping, ops: LoraOps) -> torch.Tensor:
        """x: [T, in] -> [T, sum out_i]."""
        outs = [base(x) for base in self.bases]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)  # [T, sum out]
        if mapping.any_adapter:
            scaled = bool(self._scaled_slots)
            t = ops.shrink(x, self.a_pages, self.page_table, self.ranks, mapping, rank_scale=self.rank_scales if scaled else None)  # [n, T, R]
            g = self.g_stacks if self._dora_slots else None
            ops.expand(y, t, self.bt_pages, self.page_table, self.ranks, self.scales, g, mapping, out_scale=self.out_scales if scaled else None)
        if self.bias is not None:
            y = y + self.bias
        return y
