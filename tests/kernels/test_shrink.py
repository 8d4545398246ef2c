"""shrink (Triton; the interpreter on CPU) against shrink_ref in fp32, and shrink_ref
against a dense per-token loop.

A is read from rank pages at shuffled page ids; every page row past a rank, every spare
page and the output buffer start as NaN (rank_page_cases.py), so a read past the rank,
a wrong page, or an output element left unwritten fails the comparison.
Sizes stay small: on CPU every program runs in Triton's interpreter.
"""

from dataclasses import dataclass

import pytest
import torch

from loraplex.kernels import mapping
from loraplex.kernels.mapping import SHORT_SEGMENT, LoraMapping, build_mapping
from loraplex.kernels.shrink import shrink, shrink_ref

from rank_page_cases import dense_factors, live_columns, paginate, random_ranks, with_dead_entries
from slot_mixes import token_slots

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# shrink returns fp32 for every input dtype: products of 16-bit inputs are exact in
# fp32, so only the order of the fp32 sums differs from the reference.
TOL = {  # dtype: (atol, rtol)
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (1e-3, 1e-3),
    torch.float16: (1e-3, 1e-3),
}


@dataclass
class Case:
    x: torch.Tensor  # [T, in]
    a: list[torch.Tensor]  # n × [S, R, in] dense A, NaN past each rank (for the oracle)
    pages: list[torch.Tensor]  # n × [P_i, 16, in]
    table: torch.Tensor  # [n, S, MP] int32
    ranks: torch.Tensor  # [n, S] int32
    mapping: LoraMapping

    @property
    def args(self):
        return self.x, self.pages, self.table, self.ranks, self.mapping


def make_case(num_tokens, in_features, num_slots, max_rank, n_slices, dtype, mix, seed=0, ranks=None, max_pages=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, in_features, generator=gen).to(dtype).to(DEVICE)
    ranks = random_ranks(n_slices, num_slots, max_rank, gen) if ranks is None else ranks
    a = [f.to(dtype).to(DEVICE) for f in dense_factors(ranks, [in_features] * n_slices, max_rank, gen, in_features**-0.5)]
    pages, table = paginate(a, ranks, gen, max_pages)
    mapping = build_mapping(token_slots(mix, num_tokens, num_slots, gen).to(DEVICE), num_slots)
    return Case(x, a, pages, table, ranks.to(DEVICE), mapping)


def run_shrink(c, **kw):
    out = torch.full((len(c.pages), c.x.shape[0], c.table.shape[2] * 16), float("nan"), device=DEVICE)  # poison
    res = shrink(*c.args, out=out, **kw)
    assert res is out
    return out


def check(c, got):
    want = shrink_ref(*c.args)  # fp32 math on the same (rounded) inputs
    assert want.isfinite().all()  # the reference read no poison either
    atol, rtol = TOL[c.x.dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    # base rows and every column past the token's rank exactly zero
    dead = ~live_columns(c.ranks, c.mapping.token_slots, got.shape[2])
    assert torch.equal(got[dead], torch.zeros_like(got[dead]))


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("mix", ["identical", "distinct", "zipf", "base25", "sparse"])
def test_matches_ref(dtype, mix):
    # ranks 1..128 mixed in one batch, hidden 123, three slices
    c = make_case(29, 123, 9, 128, 3, dtype, mix)
    check(c, run_shrink(c))


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("num_tokens,mix", [(13, "base25"), (48, "zipf")])
def test_ref_matches_dense_oracle(dtype, num_tokens, mix):
    # the paged Semantics, pinned without rank_pages: per token, per slice, x @ A[:r]ᵀ;
    # 48 zipf tokens: a segment past SHORT_SEGMENT (its own matmul) beside short ones (one bmm)
    ranks = random_ranks(2, 5, 40, torch.Generator().manual_seed(7))
    ranks[1, 2] = 0  # a slice this adapter does not target
    c = make_case(num_tokens, 37, 5, 40, 2, dtype, mix, seed=7, ranks=ranks)
    groups = c.mapping.slot_groups()
    assert groups.slots.numel() and bool(groups.long) == (num_tokens > SHORT_SEGMENT)
    slots = c.mapping.token_slots.tolist()
    want = torch.zeros(2, num_tokens, c.table.shape[2] * 16, device=DEVICE)
    for tok, s in enumerate(slots):
        for i in range(2):
            r = int(c.ranks[i, s]) if s >= 0 else 0
            want[i, tok, :r] = c.x[tok].float() @ c.a[i][s, :r].float().T
    torch.testing.assert_close(shrink_ref(*c.args), want, atol=1e-5, rtol=1e-5)
    check(c, run_shrink(c))


def test_wide_split_k_is_deterministic():
    # in = 2049 over 4 K splits, reduced in a fixed order: bit-identical runs
    c = make_case(5, 2049, 4, 16, 1, torch.bfloat16, "base25", seed=1)
    first = run_shrink(c, split_k=4)
    check(c, first)
    assert torch.equal(first, run_shrink(c, split_k=4))
    check(c, run_shrink(c, split_k=1))


def test_deterministic():
    c = make_case(33, 70, 6, 32, 2, torch.float16, "zipf", seed=2)
    assert torch.equal(run_shrink(c), run_shrink(c))


@pytest.mark.parametrize("max_rank,n_slices,same_rank", [(16, 4, True), (100, 3, False), (128, 1, False)])
def test_prefill_tiles(max_rank, n_slices, same_rank):
    # 300 tokens: 64-token tiles, rank tiles of up to 64 (3 slices) or 128 (1 slice);
    # 4 slices: two launches; same_rank: every slot's pages full
    ranks = torch.full((n_slices, 3), max_rank, dtype=torch.int32) if same_rank else None
    c = make_case(300, 40, 3, max_rank, n_slices, torch.bfloat16, "base25", seed=3, ranks=ranks)
    assert c.mapping.block_m == 64
    check(c, run_shrink(c))


def test_reads_nothing_past_the_rank():
    # ranks ending inside a page and a table wider than any rank: the rows past each
    # rank and the table entries past ceil(rank / 16) lead only to NaN
    ranks = torch.tensor([[1, 15, 17, 33, 47], [0, 2, 31, 16, 48]], dtype=torch.int32)
    c = make_case(17, 50, 5, 48, 2, torch.bfloat16, "zipf", seed=4, ranks=ranks, max_pages=5)
    assert c.table.shape[2] == 5 and all(p.isnan().any() for p in c.pages)
    check(c, run_shrink(c))


@pytest.mark.parametrize("num_tokens,mix", [(17, "zipf"), (48, "zipf")])
def test_ref_never_reads_table_entries_past_the_rank(num_tokens, mix, monkeypatch):
    # entries past ceil(rank / 16) out of any pool's range, and slots taken one run each
    # (MAX_GATHER 1): the same result as with the spare ids and one batched matmul
    ranks = torch.tensor([[1, 15, 17, 33, 47], [0, 2, 31, 16, 48]], dtype=torch.int32)
    c = make_case(num_tokens, 50, 5, 48, 2, torch.float32, mix, seed=4, ranks=ranks, max_pages=5)
    want = shrink_ref(*c.args)
    c.table = with_dead_entries(c.table, c.ranks)
    assert torch.equal(shrink_ref(*c.args), want)
    monkeypatch.setattr(mapping, "MAX_GATHER", 1)
    c.mapping = build_mapping(c.mapping.token_slots, 5)
    torch.testing.assert_close(shrink_ref(*c.args), want, atol=1e-6, rtol=1e-6)


def test_no_adapter_and_no_tokens():
    c = make_case(6, 32, 3, 8, 2, torch.float32, "identical")
    c.mapping = build_mapping(torch.full((6,), -1, dtype=torch.int32, device=DEVICE), 3)
    assert not c.mapping.any_adapter
    assert torch.equal(run_shrink(c), torch.zeros(2, 6, 16, device=DEVICE))
    empty = build_mapping(torch.zeros(0, dtype=torch.int32, device=DEVICE), 3)
    assert shrink(c.x[:0], c.pages, c.table, c.ranks, empty).shape == (2, 0, 16)


def test_rejects_bad_inputs():
    c = make_case(4, 32, 3, 32, 2, torch.float32, "identical")  # MP = 2
    x, pages, table, ranks, mapping = c.args
    bad = [
        (x, [p.half() for p in pages], table, ranks, mapping),  # dtype differs from x
        (x, [p[:, :8] for p in pages], table, ranks, mapping),  # not 16 rows a page
        (x, [p[..., :-1] for p in pages], table, ranks, mapping),  # width is not in
        (x, [p.transpose(1, 2).contiguous().transpose(1, 2) for p in pages], table, ranks, mapping),
        (x, pages, table.long(), ranks, mapping),
        (x, pages, table[:1], ranks, mapping),  # one slice short
        (x, pages, table.transpose(1, 2).contiguous().transpose(1, 2), ranks, mapping),
        (x, pages, table, ranks.long(), mapping),
        (x, pages, table, ranks[:, :2], mapping),
        (x[:3], pages, table, ranks, mapping),  # mapping is for 4 tokens
    ]
    for args in bad:
        with pytest.raises(ValueError):
            shrink(*args)
    with pytest.raises(ValueError):
        shrink(x, pages, table, ranks, mapping, out=torch.empty(2, 4, 16, device=DEVICE))  # R is MP * 16 = 32


@pytest.mark.gpu
def test_launch_never_syncs():
    c = make_case(64, 256, 64, 16, 3, torch.bfloat16, "distinct")
    shrink(*c.args)  # compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = shrink(*c.args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check(c, got)


@pytest.mark.parametrize("split_k", [None, 2])
def test_rank_scale_scales_each_rank_row(split_k):
    # VeRA's λ_d: t[i, tok, k] *= rank_scale[i, slot, k]; kernel, ref and the dense loop agree
    c = make_case(21, 70, 5, 40, 3, torch.float32, "base25", seed=4)
    gen = torch.Generator().manual_seed(5)
    rank_scale = torch.randn(3, 5, c.table.shape[2] * 16, generator=gen).to(DEVICE)
    got = run_shrink(c, rank_scale=rank_scale, split_k=split_k)
    want = shrink_ref(*c.args, rank_scale=rank_scale)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    plain = shrink_ref(*c.args)
    for tok, s in enumerate(c.mapping.token_slots.tolist()):
        if s >= 0:
            torch.testing.assert_close(want[:, tok], plain[:, tok] * rank_scale[:, s], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(want, plain)
    with pytest.raises(ValueError, match="rank_scale must be contiguous float32"):
        shrink(*c.args, rank_scale=rank_scale[:, :, :16])
