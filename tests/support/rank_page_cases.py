"""Rank-paged adapter cases for the shrink/expand tests (kernels/rank_pages.py).

Dense per-slot factors (rank-row-major: A [S, R, in] or Bᵀ [S, R, out]) are cut into
pages at SHUFFLED page ids, so an adapter's pages are mostly not consecutive and the
page table really matters. Everything an op must never read is NaN: rows of a page past
the adapter's rank, and the spare pages that table entries past ceil(rank / 16) point
at. An op that reads any of it returns NaN and fails its comparison.
"""

from __future__ import annotations

from typing import Sequence

import torch

from loraplex.kernels.rank_pages import RANK_PAGE, pages_for

from slot_mixes import RANK_CHOICES

POISON = float("nan")


def random_ranks(n_slices: int, num_slots: int, max_rank: int, gen: torch.Generator) -> torch.Tensor:
    """[n, S] int32: RANK_CHOICES up to max_rank (and max_rank itself), mixed in one batch."""
    choices = torch.tensor([r for r in RANK_CHOICES if r < max_rank] + [max_rank], dtype=torch.int32)
    return choices[torch.randint(0, len(choices), (n_slices, num_slots), generator=gen)]


def dense_factors(
    ranks: torch.Tensor, widths: Sequence[int], max_rank: int, gen: torch.Generator, std: float
) -> list[torch.Tensor]:
    """n × [S, max_rank, width_i] fp32 rank-row-major factors: randn * std in rows 0..r-1
    of each slot, NaN past its rank (the oracles never read past it either)."""
    out = []
    for i, w in enumerate(widths):
        f = torch.randn(ranks.shape[1], max_rank, w, generator=gen) * std  # [S, R, w]
        live = torch.arange(max_rank)[None, :] < ranks[i][:, None]  # [S, R]
        out.append(f.masked_fill(~live[:, :, None], POISON))
    return out


def shuffled_table(ranks: torch.Tensor, max_pages: int, gen: torch.Generator, spare: int = 2) -> tuple[torch.Tensor, list[int]]:
    """(page_table [n, S, MP] int32, pages per slice P_i).

    Slice i's pool holds the pages of all its slots plus `spare` unused ones, handed out
    in a random order. Table entries past ceil(rank / 16) name a random spare page."""
    n, num_slots = ranks.shape
    table = torch.empty(n, num_slots, max_pages, dtype=torch.int32)
    num_pages = []
    for i in range(n):
        need = [pages_for(int(r)) for r in ranks[i]]
        assert max(need) <= max_pages, f"rank {int(ranks[i].max())} needs more than {max_pages} pages"
        ids = torch.randperm(sum(need) + spare, generator=gen).tolist()
        spares = ids[sum(need) :]
        k = 0
        for s, m in enumerate(need):
            fill = torch.randint(0, spare, (max_pages - m,), generator=gen).tolist()
            table[i, s] = torch.tensor(ids[k : k + m] + [spares[j] for j in fill], dtype=torch.int32)
            k += m
        num_pages.append(len(ids))
    return table, num_pages


def fill_pages(
    factors: Sequence[torch.Tensor], ranks: torch.Tensor, table: torch.Tensor, num_pages: Sequence[int]
) -> list[torch.Tensor]:
    """n × [P_i, 16, width_i] pages (the factors' dtype and device): NaN everywhere but
    rows 0..r-1 of each slot's factor, at the pages the table names."""
    pages = []
    for i, f in enumerate(factors):  # f: [S, R, w]
        p = torch.full((num_pages[i], RANK_PAGE, f.shape[-1]), POISON, dtype=f.dtype, device=f.device)  # [P, 16, w]
        for s in range(f.shape[0]):
            r = int(ranks[i, s])
            for j in range(pages_for(r)):
                rows = f[s, j * RANK_PAGE : min((j + 1) * RANK_PAGE, r)]  # [<=16, w]
                p[int(table[i, s, j]), : rows.shape[0]] = rows
        pages.append(p)
    return pages


def paginate(
    factors: Sequence[torch.Tensor], ranks: torch.Tensor, gen: torch.Generator, max_pages: int | None = None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(pages n × [P_i, 16, width_i], page_table [n, S, MP] int32 on the factors' device)
    for factors n × [S, R, width_i]; MP defaults to ceil(R / 16)."""
    table, num_pages = shuffled_table(ranks, max_pages or pages_for(factors[0].shape[1]), gen)
    return fill_pages(factors, ranks, table, num_pages), table.to(factors[0].device)


def with_dead_entries(table: torch.Tensor, ranks: torch.Tensor, value: int = 10**6) -> torch.Tensor:
    """`table` [n, S, MP] with every entry past ceil(rank / 16) set to `value`: out of any
    pool's range, so an op that reads one as a page id fails."""
    need = (ranks.long() + RANK_PAGE - 1) // RANK_PAGE  # [n, S]
    dead = torch.arange(table.shape[2], device=table.device)[None, None, :] >= need.to(table.device)[:, :, None]
    return table.masked_fill(dead, value)


def live_columns(ranks: torch.Tensor, token_slots: torch.Tensor, width: int) -> torch.Tensor:
    """[n, T, width] bool: column c of t[i, tok] is below rank[i, slot(tok)] (base tokens: none)."""
    slots = token_slots.long().cpu()  # [T]
    r = torch.where(slots[None, :] >= 0, ranks.cpu()[:, slots.clamp(min=0)], 0)  # [n, T]
    return (torch.arange(width)[None, None, :] < r[:, :, None]).to(token_slots.device)
