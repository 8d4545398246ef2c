"""kernels/rank_pages.py: page counts, reading and writing an adapter's rows, table checks."""

import pytest
import torch

from loraplex.kernels.rank_pages import RANK_PAGE, check_table, pages_for, rows_of, write_rows


def numbered_pages(num_pages, width):
    """[P, 16, width] fp32 where element (p, j, c) = 1000 p + 10 j + c / 100: every row distinct."""
    p = torch.arange(num_pages)[:, None, None] * 1000.0
    j = torch.arange(RANK_PAGE)[None, :, None] * 10.0
    c = torch.arange(width)[None, None, :] / 100.0
    return (p + j + c).contiguous()


@pytest.mark.parametrize("rank,pages", [(0, 0), (1, 1), (15, 1), (16, 1), (17, 2), (32, 2), (33, 3), (100, 7), (128, 8)])
def test_pages_for(rank, pages):
    assert RANK_PAGE == 16
    assert pages_for(rank) == pages


@pytest.mark.parametrize("rank", [1, 16, 20, 48])
def test_rows_of_consecutive_ids_is_a_view(rank):
    pages = numbered_pages(6, 5)
    n = pages_for(rank)
    ids = list(range(2, 2 + n)) + [99, -7]  # entries past ceil(rank / 16) are never read
    rows = rows_of(pages, ids, rank)  # [rank, 5]
    assert rows.shape == (rank, 5)
    assert torch.equal(rows, pages[2 : 2 + n].reshape(-1, 5)[:rank])
    assert rows.data_ptr() == pages[2].data_ptr()
    pages[2, 0, 0] = -1.0  # shares storage with the pages
    assert rows[0, 0] == -1.0


@pytest.mark.parametrize("ids", [[4, 1, 3], [3, 2, 1], [0, 2, 4], [5, 5, 5]])
def test_rows_of_gathers_other_ids(ids):
    pages = numbered_pages(6, 7)
    rows = rows_of(pages, ids + [99], 40)  # [40, 7]: two full pages and 8 rows of the third
    want = torch.cat([pages[ids[0]], pages[ids[1]], pages[ids[2], :8]])
    assert torch.equal(rows, want)
    pages.zero_()  # a copy: unchanged
    assert torch.equal(rows, want)


@pytest.mark.parametrize("rank", [1, 16, 20, 33])
def test_write_rows_zeroes_the_tail_of_the_last_page(rank):
    pages = torch.full((5, RANK_PAGE, 3), float("nan"))
    rows = torch.randn(rank, 3)
    n = pages_for(rank)
    ids = [4, 0, 2][:n] + [1, 3]  # entries past ceil(rank / 16) are left alone
    write_rows(pages, ids, rows)
    assert torch.equal(rows_of(pages, ids, rank), rows)
    last = pages[ids[n - 1]]  # [16, 3]
    tail = rank - (n - 1) * RANK_PAGE
    assert torch.equal(last[tail:], torch.zeros(RANK_PAGE - tail, 3))
    untouched = [p for p in range(5) if p not in ids[:n]]
    assert pages[untouched].isnan().all()


def test_write_rows_over_old_rows():
    pages = torch.ones(3, RANK_PAGE, 4)
    write_rows(pages, [2], torch.full((5, 4), 7.0))
    assert torch.equal(pages[2, :5], torch.full((5, 4), 7.0)) and torch.equal(pages[2, 5:], torch.zeros(11, 4))
    assert torch.equal(pages[:2], torch.ones(2, RANK_PAGE, 4))


def test_check_table_accepts():
    table = torch.zeros(3, 5, 4, dtype=torch.int32)  # [n, S, MP]
    ranks = torch.zeros(3, 5, dtype=torch.int32)
    assert check_table(table, ranks, 3) == (5, 4)


@pytest.mark.parametrize(
    "table,ranks",
    [
        (torch.zeros(3, 5, dtype=torch.int32), torch.zeros(3, 5, dtype=torch.int32)),  # not 3-d
        (torch.zeros(2, 5, 4, dtype=torch.int32), torch.zeros(2, 5, dtype=torch.int32)),  # 2 slices, not 3
        (torch.zeros(3, 5, 4, dtype=torch.int64), torch.zeros(3, 5, dtype=torch.int32)),
        (torch.zeros(3, 4, 5, dtype=torch.int32).transpose(1, 2), torch.zeros(3, 5, dtype=torch.int32)),
        (torch.zeros(3, 5, 4, dtype=torch.int32), torch.zeros(3, 4, dtype=torch.int32)),  # S differs
        (torch.zeros(3, 5, 4, dtype=torch.int32), torch.zeros(3, 5, dtype=torch.int64)),
        (torch.zeros(3, 5, 4, dtype=torch.int32), torch.zeros(5, 3, dtype=torch.int32).t()),
    ],
)
def test_check_table_rejects(table, ranks):
    with pytest.raises(ValueError):
        check_table(table, ranks, 3)


def test_rows_of_rank_zero_is_empty():
    pages = torch.randn(3, RANK_PAGE, 5)
    assert rows_of(pages, [], 0).shape == (0, 5)
