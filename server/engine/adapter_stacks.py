"""The adapter tensors of every adapter layer, stacked by width, and their one writer.

Every slice (q, k, v, o, gate, up and down of every layer) has rank pages of A
[P, 16, in] and of Bᵀ [P, 16, out], and per slot a page-table row, a scale, a rank, the
vectors g and o [out] (DoRA's magnitude, VeRA's λ_b) and d [R] (VeRA's λ_d, AdaLoRA's
singular values). Slices of equal width share one tensor: A pages of width w live in
`a[w]` [n_w, P, 16, w], Bᵀ pages, g and o of width w in `bt[w]`, `g[w]`, `o[w]`, and the
per-slot rows of all K slices in `page_table` [K, S, MP], `scales`, `ranks` [K, S] and
`rank_scales` [K, S, R]. Each AdapterLinear holds views into these stacks (`attach`),
which is all the kernels read; the views never move, so CUDA graphs may capture them.

Writing one adapter into a slot is then a few ops for the whole model, whatever its
depth: one index_copy per width for the pages and one column copy (or fill) per kind for
the slot's rows — 20-odd ops for a Llama, against a few per slice (over 2,000 for a
32-layer model) when each layer held its own tensors. On CUDA those ops are launches on
the side stream, so a load costs the thread that issues it well under a millisecond.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from loraplex.kernels.rank_pages import RANK_PAGE


@dataclass(frozen=True)
class SliceSpot:
    """Where one slice's tensors sit in the stacks."""

    k: int  # row of page_table, scales, ranks and rank_scales
    in_width: int
    a: int  # index in a[in_width]
    out_width: int
    b: int  # index in bt[out_width], g[out_width] and o[out_width]


Rows = tuple[torch.Tensor, torch.Tensor]  # (row index [n] int64 into a stack viewed as [rows, ...], the rows)


@dataclass(frozen=True)
class SlotRows:
    """Everything one adapter writes into one slot, on the device (AdapterPages.apply).
    The vectors' rows index [n_w, S, w] viewed as [n_w * S, w] (row b * S + slot), the
    pages' [n_w, P, 16, w] viewed as [n_w * P, 16, w] (row a * P + page)."""

    page_table: torch.Tensor  # [K, MP] int32, zeros past each slice's pages
    ranks: torch.Tensor  # [K] int32, 0 for a slice the adapter does not adapt
    scales: torch.Tensor  # [K] float32
    d: Rows | None  # into rank_scales: [m, R] float32, for the slices that have d (the rest: ones)
    g: dict[int, Rows]  # width -> into g[w]: [m_w, w], for the slices that have g (the rest: ones)
    o: dict[int, Rows]  # the same for o
    a_pages: dict[int, Rows]  # width -> into a[w]: [n, 16, w], the fresh pages
    bt_pages: dict[int, Rows]  # the same for Bᵀ


class AdapterStacks:
    def __init__(self, groups, num_slots: int, max_pages: int, num_pages: int):
        """Allocates the stacks for `groups` (AdapterLinear, in the model's order) and
        attaches each group's views: `num_pages` rank pages per slice, `num_slots` slots
        of at most `max_pages` pages. Every slot starts empty."""
        first = groups[0]
        dt, dev = first.dtype, first.device
        self.num_slots, self.max_pages, self.num_pages = num_slots, max_pages, num_pages
        a_count: Counter[int] = Counter()
        b_count: Counter[int] = Counter()
        self.spots: list[list[SliceSpot]] = []  # [group][slice]
        k = 0
        for group in groups:
            row = []
            for w in group.widths:
                row.append(SliceSpot(k, group.in_features, a_count[group.in_features], w, b_count[w]))
                a_count[group.in_features] += 1
                b_count[w] += 1
                k += 1
            self.spots.append(row)
        self.num_slices = k
        P, S, MP = num_pages, num_slots, max_pages
        self.a = {w: torch.zeros(n, P, RANK_PAGE, w, dtype=dt, device=dev) for w, n in sorted(a_count.items())}  # w -> [n_w, P, 16, w]
        self.bt = {w: torch.zeros(n, P, RANK_PAGE, w, dtype=dt, device=dev) for w, n in sorted(b_count.items())}  # w -> [n_w, P, 16, w]
        self.g = {w: torch.ones(n, S, w, dtype=dt, device=dev) for w, n in sorted(b_count.items())}  # w -> [n_w, S, w]
        self.o = {w: torch.ones(n, S, w, dtype=dt, device=dev) for w, n in sorted(b_count.items())}  # w -> [n_w, S, w]
        self.page_table = torch.zeros(k, S, MP, dtype=torch.int32, device=dev)  # [K, S, MP]
        self.scales = torch.zeros(k, S, dtype=torch.float32, device=dev)  # [K, S]
        self.ranks = torch.zeros(k, S, dtype=torch.int32, device=dev)  # [K, S]
        self.rank_scales = torch.ones(k, S, MP * RANK_PAGE, dtype=torch.float32, device=dev)  # [K, S, R]
        for group, spots in zip(groups, self.spots):
            rows = slice(spots[0].k, spots[-1].k + 1)
            group.attach(
                num_slots, max_pages, num_pages,
                a_pages=[self.a[s.in_width][s.a] for s in spots],
                bt_pages=[self.bt[s.out_width][s.b] for s in spots],
                g_stacks=[self.g[s.out_width][s.b] for s in spots],
                out_scales=[self.o[s.out_width][s.b] for s in spots],
                page_table=self.page_table[rows], scales=self.scales[rows], ranks=self.ranks[rows], rank_scales=self.rank_scales[rows],
            )  # fmt: skip

    def write(self, slot: int, rows: SlotRows) -> None:
        """Writes one adapter into `slot`: its fresh pages, then every slice's rows of the
        slot (a slice the adapter leaves alone gets rank 0 and ones). The caller makes
        sure that no running request reads the slot or the pages."""
        for stack, pages in ((self.a, rows.a_pages), (self.bt, rows.bt_pages)):
            for w, (index, src) in pages.items():
                stack[w].view(-1, RANK_PAGE, w).index_copy_(0, index, src)  # [n_w * P, 16, w]
        self.page_table[:, slot].copy_(rows.page_table)
        self.ranks[:, slot].copy_(rows.ranks)
        self.scales[:, slot].copy_(rows.scales)
        self.rank_scales[:, slot].fill_(1.0)
        if rows.d is not None:
            self.rank_scales.view(-1, self.rank_scales.shape[-1]).index_copy_(0, *rows.d)  # [K * S, R]
        for stack, vectors in ((self.g, rows.g), (self.o, rows.o)):
            for w, t in stack.items():
                t[:, slot].fill_(1.0)
                if w in vectors:
                    t.view(-1, w).index_copy_(0, *vectors[w])  # [n_w * S, w]
