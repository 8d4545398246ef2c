"""Rank-paged adapter storage: the layout the shrink/expand ops read adapters from.

An adapter's factors of one target module are cut into pages of `RANK_PAGE` rank rows:

    A [r, in]   -> ceil(r / 16) pages of a_pages [P, 16, in]    (rows of A)
    B [out, r]  -> ceil(r / 16) pages of bt_pages [P, 16, out]  (rows of Bᵀ)

and `page_table[i, slot, j]` names the page that holds rank rows [16 j, 16 j + 16) of
slice i's adapter in `slot`. A rank-8 adapter takes one page where a rank-128 one takes
eight, so the pool holds adapters of mixed ranks without padding each to the largest
(S-LoRA's observation): only the last page of an adapter is partly used. Rows of a page
past the adapter's rank, and table entries past ceil(rank / 16), are never read.

Both factors are stored rank-row-major, so one page is a contiguous [16, width] block:
one tensor-core K step of shrink (A) and of expand (Bᵀ), and a plain view on the CPU
when an adapter's pages are consecutive (`rows_of`).
"""

from __future__ import annotations

from typing import Sequence

import torch

RANK_PAGE = 16  # rank rows per page: the K of one bf16 tensor-core dot


def pages_for(rank: int) -> int:
    """Pages that hold `rank` rank rows."""
    return -(-rank // RANK_PAGE)


def rows_of(pages: torch.Tensor, page_ids: Sequence[int], rank: int) -> torch.Tensor:
    """[rank, width] rows 0..rank-1 of one adapter's factor, from `pages` [P, 16, width]
    and its page ids in order. A view (no copy) when the ids are consecutive."""
    n = pages_for(rank)
    if n == 0:
        return pages.new_empty(0, pages.shape[-1])
    ids = list(page_ids[:n])
    first = ids[0]
    if ids == list(range(first, first + n)):
        return pages[first : first + n].reshape(n * RANK_PAGE, -1)[:rank]
    return pages[torch.tensor(ids, dtype=torch.long, device=pages.device)].reshape(n * RANK_PAGE, -1)[:rank]


def write_rows(pages: torch.Tensor, page_ids: Sequence[int], rows: torch.Tensor) -> None:
    """Writes `rows` [r, width] into the pages `page_ids` (ceil(r / 16) of them) of
    `pages` [P, 16, width]; rows of the last page past r are zeroed."""
    r = rows.shape[0]
    for j, p in enumerate(page_ids[: pages_for(r)]):
        chunk = rows[j * RANK_PAGE : (j + 1) * RANK_PAGE]  # [<=16, width]
        pages[p, : chunk.shape[0]].copy_(chunk)
        pages[p, chunk.shape[0] :].zero_()


def check_table(page_table: torch.Tensor, ranks: torch.Tensor, n_slices: int) -> tuple[int, int]:
    """Validates the page table [n, S, MP] and ranks [n, S] (int32, contiguous) of an
    op over `n_slices` slices; returns (S, MP)."""
    if page_table.dim() != 3 or page_table.shape[0] != n_slices:
        raise ValueError(f"page_table must be [{n_slices}, S, max_pages], got {tuple(page_table.shape)}")
    if page_table.dtype != torch.int32 or not page_table.is_contiguous():
        raise ValueError("page_table must be contiguous int32")
    _, num_slots, max_pages = page_table.shape
    if ranks.shape != (n_slices, num_slots) or ranks.dtype != torch.int32 or not ranks.is_contiguous():
        raise ValueError(f"ranks must be contiguous int32 [{n_slices}, {num_slots}]")
    return num_slots, max_pages


def gather_rows(pages: torch.Tensor, page_ids: torch.Tensor, ranks: torch.Tensor, num_pages: int, *, zero_past_rank: bool = True) -> torch.Tensor:
    """[D, 16 * num_pages, width] rows 0..16·num_pages-1 of D adapters' factors, from `pages`
    [P, 16, width], their page ids `page_ids` [D, >= num_pages] and ranks [D]. Table entries
    past ceil(rank / 16) are never read (whatever they hold: page 0 stands in for them).
    zero_past_rank: rows past each rank are zero; False: they hold whatever the pages do,
    for a caller that masks its output instead. num_pages: at least ceil(max rank / 16)."""
    d, width = page_ids.shape[0], pages.shape[-1]
    ids = page_ids[:, :num_pages].long()  # [D, n]
    live_pages = torch.arange(num_pages, device=ids.device)[None, :] * RANK_PAGE < ranks[:, None]  # [D, n]
    rows = pages[torch.where(live_pages, ids, 0)].reshape(d, num_pages * RANK_PAGE, width)  # [D, R, width]
    if not zero_past_rank:
        return rows
    return torch.where(live_rows(ranks, num_pages * RANK_PAGE)[:, :, None], rows, torch.zeros((), dtype=rows.dtype, device=rows.device))


def live_rows(ranks: torch.Tensor, width: int) -> torch.Tensor:
    """[D, width] bool: rank row j of adapter d is below its rank ranks[d]."""
    return torch.arange(width, device=ranks.device)[None, :] < ranks[:, None]
