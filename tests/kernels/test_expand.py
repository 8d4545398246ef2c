"""expand (Triton; the interpreter on CPU) against expand_ref in fp32, expand_ref against
a dense per-token loop, and the shrink+expand pair under CUDA-graph replay on a GPU.

Bᵀ is read from rank pages at shuffled page ids; every page row past a rank, every spare
page, and every element of t past its token's rank (all of a base token's row) is NaN
(rank_page_cases.py), so reading any of them fails the comparison. expand updates y in
place, so "poison" for y means: every updated element must move by a delta far above
the tolerance (an element the kernel skipped fails), and base rows must stay bit-exact.
Sizes stay small: on CPU every program runs in Triton's interpreter.
"""

from dataclasses import dataclass

import pytest
import torch

from loraplex.kernels.expand import expand, expand_ref
from loraplex.kernels import mapping
from loraplex.kernels.mapping import SHORT_SEGMENT, LoraMapping, LoraMappingBuffers, build_mapping
from loraplex.kernels.shrink import shrink, shrink_ref

from rank_page_cases import dense_factors, fill_pages, live_columns, paginate, random_ranks, shuffled_table, with_dead_entries
from slot_mixes import token_slots

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# y is rounded to its dtype once; on a GPU the 16-bit paths multiply t in tf32 (11-bit
# mantissa), below one bf16 ulp and about one fp16 ulp. rtol covers one ulp of the dtype.
TOL = {  # dtype: (atol, rtol)
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (3e-2, 1.6e-2),
    torch.float16: (4e-3, 2e-3),
}
QKV = [48, 17, 17]  # q|k|v-like: unequal widths (GQA), one not a multiple of anything


@dataclass
class Case:
    y: torch.Tensor  # [T, sum out_i], the input (each run updates a clone)
    t: torch.Tensor  # [n, T, MP * 16] fp32, NaN past each token's rank
    bt: list[torch.Tensor]  # n × [S, R, out_i] dense Bᵀ, NaN past each rank (for the oracle)
    pages: list[torch.Tensor]  # n × [P_i, 16, out_i]
    table: torch.Tensor  # [n, S, MP] int32
    ranks: torch.Tensor  # [n, S] int32
    scales: torch.Tensor  # [n, S] fp32
    g: list[torch.Tensor] | None  # n × [S, out_i] fp32
    mapping: LoraMapping

    @property
    def args(self):  # expand's arguments after y
        return self.t, self.pages, self.table, self.ranks, self.scales, self.g, self.mapping


def make_case(num_tokens, widths, num_slots, max_rank, dtype, mix, seed=0, dora=True, ranks=None, max_pages=None):
    """With `dora`, even slots get a magnitude scale g and odd slots g = 1 (plain LoRA
    rows beside DoRA rows)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(widths)
    ranks = random_ranks(n, num_slots, max_rank, gen) if ranks is None else ranks
    slots = token_slots(mix, num_tokens, num_slots, gen)
    bt = [f.to(dtype).to(DEVICE) for f in dense_factors(ranks, widths, max_rank, gen, max_rank**-0.5)]
    pages, table = paginate(bt, ranks, gen, max_pages)
    t = torch.randn(n, num_tokens, table.shape[2] * 16, generator=gen)
    t[~live_columns(ranks, slots, t.shape[2])] = float("nan")  # never read
    gs = []
    for w in widths:
        g = 0.5 + torch.rand(num_slots, w, generator=gen)
        g[1::2] = 1.0
        gs.append(g.to(DEVICE))
    scales = (1.0 + 2.0 * torch.rand(n, num_slots, generator=gen)).to(DEVICE)  # deltas well above tolerance
    y = torch.randn(num_tokens, sum(widths), generator=gen).to(dtype).to(DEVICE)
    mapping = build_mapping(slots.to(DEVICE), num_slots)
    return Case(y, t.to(DEVICE), bt, pages, table, ranks.to(DEVICE), scales, gs if dora else None, mapping)


def reference(y, t, pages, table, ranks, scales, g, mapping):
    """expand_ref in fp32 on the same (rounded) inputs."""
    want = y.float().clone()
    expand_ref(want, t.float(), [p.float() for p in pages], table, ranks, scales, g, mapping)
    return want


def check(y0, got, want, mapping, min_moved=0.95):
    assert want.isfinite().all()  # the reference read no poison either
    atol, rtol = TOL[y0.dtype]
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=rtol)
    base = mapping.token_slots < 0
    assert torch.equal(got[base], y0[base])  # base rows untouched, bit for bit
    moved = (got.float() - y0.float()).abs()[~base]
    # every adapter-row element must have been rewritten (deltas here are O(1))
    assert (moved > 0).float().mean() > min_moved


def run_expand(y, *args):
    out = y.clone()
    expand(out, *args)
    return out


def check_case(c, min_moved=0.95):
    check(c.y, run_expand(c.y, *c.args), reference(c.y, *c.args), c.mapping, min_moved)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("mix", ["identical", "distinct", "zipf", "base25", "sparse"])
def test_matches_ref(dtype, mix):
    # q|k|v of unequal widths in one launch, ranks 1..128 mixed, DoRA rows beside plain rows
    check_case(make_case(29, QKV, 9, 128, dtype, mix))


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("dora", [True, False])
@pytest.mark.parametrize("num_tokens,mix", [(13, "base25"), (48, "zipf")])
def test_ref_matches_dense_oracle(dtype, dora, num_tokens, mix):
    # the paged Semantics, pinned without rank_pages: per token, per slice,
    # y += scale * t[:r] @ Bᵀ[:r], then times g; 48 zipf tokens: a segment past
    # SHORT_SEGMENT (its own matmul) beside short ones (one bmm)
    ranks = random_ranks(2, 5, 40, torch.Generator().manual_seed(7))
    ranks[1, 2] = 0  # a slice this adapter does not target: y untouched (but for g)
    c = make_case(num_tokens, [9, 20], 5, 40, dtype, mix, seed=7, dora=dora, ranks=ranks)
    assert bool(c.mapping.slot_groups().long) == (num_tokens > SHORT_SEGMENT)
    want = c.y.float().clone()
    for tok, s in enumerate(c.mapping.token_slots.tolist()):
        if s < 0:
            continue
        for i, cols in enumerate([slice(0, 9), slice(9, 29)]):
            r = int(c.ranks[i, s])
            want[tok, cols] += c.scales[i, s] * (c.t[i, tok, :r] @ c.bt[i][s, :r].float())
            if dora:
                want[tok, cols] *= c.g[i][s]
    got = c.y.float().clone()
    expand_ref(got, c.t, [p.float() for p in c.pages], c.table, c.ranks, c.scales, c.g, c.mapping)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    check_case(c, min_moved=0.5)  # the rank-0 slice of slot 2 moves only where g != 1


def test_wide_output_no_dora():
    check_case(make_case(5, [2049], 3, 16, torch.bfloat16, "base25", seed=1, dora=False))


def test_deterministic_and_bf16_t():
    c = make_case(33, QKV, 6, 32, torch.float16, "zipf", seed=2)
    c.t = c.t.bfloat16()
    first = run_expand(c.y, *c.args)
    assert torch.equal(first, run_expand(c.y, *c.args))
    check(c.y, first, reference(c.y, *c.args), c.mapping)


def test_prefill_tiles_same_rank_and_four_slices():
    # 300 tokens: 64-token tiles; 4 slices: two launches; every slot at rank MP * 16: full pages
    ranks = torch.full((4, 3), 16, dtype=torch.int32)
    c = make_case(300, [16, 9, 20, 7], 3, 16, torch.float32, "base25", seed=3, ranks=ranks)
    assert c.mapping.block_m == 64
    check_case(c)


def test_reads_nothing_past_the_rank():
    # ranks ending inside a page and a table wider than any rank: the rows past each
    # rank and the table entries past ceil(rank / 16) lead only to NaN
    ranks = torch.tensor([[1, 15, 17, 33, 47], [2, 31, 16, 48, 5], [48, 3, 32, 1, 20]], dtype=torch.int32)
    c = make_case(17, QKV, 5, 48, torch.bfloat16, "zipf", seed=4, ranks=ranks, max_pages=5)
    assert c.table.shape[2] == 5 and all(p.isnan().any() for p in c.pages) and c.t.isnan().any()
    check_case(c)


@pytest.mark.parametrize("num_tokens", [17, 48])
def test_ref_never_reads_table_entries_past_the_rank(num_tokens, monkeypatch):
    # entries past ceil(rank / 16) out of any pool's range, and slots taken one run each
    # (MAX_GATHER 1): the same result as with the spare ids and one batched matmul
    ranks = torch.tensor([[1, 15, 17, 33, 47], [2, 31, 16, 48, 5], [48, 3, 32, 1, 20]], dtype=torch.int32)
    c = make_case(num_tokens, QKV, 5, 48, torch.float32, "zipf", seed=4, ranks=ranks, max_pages=5)
    want = reference(c.y, *c.args)
    garbage = with_dead_entries(c.table, c.ranks)
    assert torch.equal(reference(c.y, c.t, c.pages, garbage, c.ranks, c.scales, c.g, c.mapping), want)
    monkeypatch.setattr(mapping, "MAX_GATHER", 1)
    runs = build_mapping(c.mapping.token_slots, 5)
    torch.testing.assert_close(reference(c.y, c.t, c.pages, garbage, c.ranks, c.scales, c.g, runs), want, atol=1e-6, rtol=1e-6)


def test_shrink_then_expand():
    # the pair as a linear layer uses it: q|k|v from hidden 123, fp16, zipf over 7
    # adapters; A and Bᵀ share one page table (one page id holds both factors' rows)
    gen = torch.Generator().manual_seed(5)
    ranks = random_ranks(3, 7, 32, gen)
    table, num_pages = shuffled_table(ranks, 2, gen)
    a = [f.half().to(DEVICE) for f in dense_factors(ranks, [123] * 3, 32, gen, 123**-0.5)]
    bt = [f.half().to(DEVICE) for f in dense_factors(ranks, QKV, 32, gen, 32**-0.5)]
    a_pages, bt_pages = fill_pages(a, ranks, table, num_pages), fill_pages(bt, ranks, table, num_pages)
    table, ranks = table.to(DEVICE), ranks.to(DEVICE)
    mapping = build_mapping(token_slots("zipf", 21, 7, gen).to(DEVICE), 7)
    x = torch.randn(21, 123, generator=gen).half().to(DEVICE)
    y = torch.randn(21, sum(QKV), generator=gen).half().to(DEVICE)
    scales = (1.0 + torch.rand(3, 7, generator=gen)).to(DEVICE)
    got = y.clone()
    expand(got, shrink(x, a_pages, table, ranks, mapping), bt_pages, table, ranks, scales, None, mapping)
    t = shrink_ref(x, a_pages, table, ranks, mapping)
    check(y, got, reference(y, t, bt_pages, table, ranks, scales, None, mapping), mapping)


def test_no_adapter_leaves_y_alone():
    c = make_case(6, QKV, 3, 8, torch.float32, "identical")
    c.mapping = build_mapping(torch.full((6,), -1, dtype=torch.int32, device=DEVICE), 3)
    assert torch.equal(run_expand(c.y, *c.args), c.y)
    empty = build_mapping(torch.zeros(0, dtype=torch.int32, device=DEVICE), 3)
    expand(c.y[:0], c.t[:, :0], c.pages, c.table, c.ranks, c.scales, c.g, empty)


def test_rejects_bad_inputs():
    c = make_case(4, QKV, 3, 32, torch.float32, "identical")  # MP = 2
    y, (t, pages, table, ranks, scales, g, mapping) = c.y, c.args
    bad = [
        (y[:, :-1], t, pages, table, ranks, scales, g, mapping),  # slices do not cover y
        (y, t.half(), pages, table, ranks, scales, g, mapping),  # t must never be fp16
        (y, t[..., :16].contiguous(), pages, table, ranks, scales, g, mapping),  # t is not MP * 16 wide
        (y, t.transpose(1, 2).contiguous().transpose(1, 2), pages, table, ranks, scales, g, mapping),
        (y, t, [p.half() for p in pages], table, ranks, scales, g, mapping),
        (y, t, [p[:, :8].contiguous() for p in pages], table, ranks, scales, g, mapping),  # not 16 rows a page
        (y, t, [p.transpose(1, 2).contiguous().transpose(1, 2) for p in pages], table, ranks, scales, g, mapping),
        (y, t, pages, table.long(), ranks, scales, g, mapping),
        (y, t, pages, table[:2], ranks, scales, g, mapping),  # one slice short
        (y, t, pages, table, ranks.long(), scales, g, mapping),
        (y, t, pages, table, ranks[:, :2], scales, g, mapping),
        (y, t, pages, table, ranks, scales.double(), g, mapping),
        (y, t, pages, table, ranks, scales, g[:2], mapping),
        (y, t, pages, table, ranks, scales, [gi[:, :-1] for gi in g], mapping),
        (y[:3], t[:, :3], pages, table, ranks, scales, g, mapping),  # mapping is for 4 tokens
    ]
    for args in bad:
        with pytest.raises(ValueError):
            expand(*args)


@pytest.mark.gpu
def test_cuda_graph_replay_with_new_mapping():
    """Capture shrink+expand for a decode step, rewrite the mapping buffers with another
    mapping of the same token count, replay, compare with the references."""
    num_tokens, num_slots, max_rank, hidden = 64, 64, 32, 256
    gen = torch.Generator().manual_seed(6)
    widths = [256, 64, 64]
    ranks = random_ranks(3, num_slots, max_rank, gen)
    table, num_pages = shuffled_table(ranks, 2, gen)
    a = [f.bfloat16().cuda() for f in dense_factors(ranks, [hidden] * 3, max_rank, gen, 1 / 16)]
    bt = [f.bfloat16().cuda() for f in dense_factors(ranks, widths, max_rank, gen, max_rank**-0.5)]
    a_pages, bt_pages = fill_pages(a, ranks, table, num_pages), fill_pages(bt, ranks, table, num_pages)
    table, ranks = table.cuda(), ranks.cuda()
    scales = (1.0 + 2.0 * torch.rand(3, num_slots, generator=gen)).cuda()
    gs = [(0.5 + torch.rand(num_slots, w, generator=gen)).cuda() for w in widths]
    x = torch.randn(num_tokens, hidden, generator=gen).bfloat16().cuda()
    y0 = torch.randn(num_tokens, sum(widths), generator=gen).bfloat16().cuda()
    buffers = LoraMappingBuffers(num_tokens, num_slots, "cuda")
    first = torch.randperm(num_slots, generator=gen)[:num_tokens].to(torch.int32).cuda()
    mapping = buffers.update(first)
    t = torch.empty(3, num_tokens, table.shape[2] * 16, device="cuda")
    y = y0.clone()

    def step():
        shrink(x, a_pages, table, ranks, mapping, out=t)
        expand(y, t, bt_pages, table, ranks, scales, gs, mapping)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    y.copy_(y0)
    with torch.cuda.graph(graph):
        step()

    for new in (
        torch.randint(-1, num_slots, (num_tokens,), generator=gen),  # uniform, some base rows
        torch.full((num_tokens,), 3),  # one adapter
        torch.tensor([5, -1] * (num_tokens // 2)),
    ):
        buffers.update(new.to(torch.int32).cuda())  # same buffers, new contents
        y.copy_(y0)
        graph.replay()
        torch.cuda.synchronize()
        ref_map = build_mapping(new.to(torch.int32).cuda(), num_slots)
        want = reference(y0, shrink_ref(x, a_pages, table, ranks, ref_map), bt_pages, table, ranks, scales, gs, ref_map)
        check(y0, y.clone(), want, ref_map)


@pytest.mark.gpu
def test_launch_never_syncs():
    c = make_case(64, [256, 64, 64], 64, 16, torch.bfloat16, "distinct")
    expand(c.y.clone(), *c.args)  # compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = c.y.clone()
        expand(got, *c.args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check(c.y, got, reference(c.y, *c.args), c.mapping)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_scale_scales_the_delta_before_g(dtype):
    # VeRA's λ_b scales the delta (not y): v = g ⊙ (y + s · o ⊙ (t Bᵀ)); o = 1 rows are plain LoRA
    c = make_case(17, QKV, 6, 40, dtype, "zipf", seed=3)
    gen = torch.Generator().manual_seed(9)
    outs = []
    for w in QKV:
        o = torch.randn(6, w, generator=gen)
        o[::2] = 1.0
        outs.append(o.to(dtype).to(DEVICE))
    got = c.y.clone()
    expand(got, *c.args, out_scale=outs)
    want = c.y.float().clone()
    expand_ref(want, c.t.float(), [p.float() for p in c.pages], c.table, c.ranks, c.scales, c.g, c.mapping, out_scale=[o.float() for o in outs])
    check(c.y, got, want, c.mapping)
    plain = reference(c.y, *c.args)
    col = 0
    for i, w in enumerate(QKV):  # the dense rule, from the plain result: undo g, scale the delta, redo g
        for tok, s in enumerate(c.mapping.token_slots.tolist()):
            if s >= 0:
                y0, gv = c.y[tok, col : col + w].float(), c.g[i][s]
                expect = gv * (y0 + outs[i][s].float() * (plain[tok, col : col + w] / gv - y0))
                torch.testing.assert_close(want[tok, col : col + w], expect, atol=1e-3, rtol=1e-3)
        col += w
    with pytest.raises(ValueError, match="out_scale slices must be contiguous"):
        expand(c.y.clone(), *c.args, out_scale=[o[:, :1] for o in outs])
