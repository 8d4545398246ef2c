"""paged_attention (Triton; the interpreter on CPU) against paged_attention_ref in fp32,
and paged_attention_ref against dense attention written out per query.

Each sequence's context sits in shuffled cache blocks. Every cache row that is not some
sequence's context (spare blocks, the tail of a last block), every block-table entry
past a sequence's blocks (pointing at a NaN block), the rows of the metadata past
num_seqs (junk lengths), and the output buffer all start as NaN, so a wrong read or an
unwritten output element fails the comparison. Sizes stay small: on CPU every program
runs in Triton's interpreter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from loraplex.kernels.paged_attention import MAX_SPLITS, _num_splits, paged_attention, paged_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The kernel sums in fp32 like the reference; 16-bit outputs differ by their rounding
# (bf16: 2^-7 relative where Triton's interpreter truncates) and, on the GPU, by the
# softmax weights rounded to the input dtype before the P @ V dot.
TOL = {  # dtype: (atol, rtol)
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (1e-2, 1.6e-2),
    torch.float16: (2e-3, 2e-3),
}
NAN_BLOCKS = 2  # spare cache blocks, all NaN; table padding points at them


@dataclass
class Case:
    q: torch.Tensor  # [T, H, D], possibly a strided view
    k_cache: torch.Tensor  # [num_blocks * bs, KVH, D]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [max_seqs, max_blocks] int32
    context_lens: torch.Tensor  # [max_seqs] int32
    query_starts: torch.Tensor  # [max_seqs + 1] int32
    num_seqs: int
    max_query_len: int
    block_size: int
    scale: float
    window: int | None
    dense_k: list[torch.Tensor]  # num_seqs × [ctx_b, KVH, D], the contexts before paging
    dense_v: list[torch.Tensor]

    @property
    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.context_lens, self.query_starts,
                self.num_seqs, self.max_query_len, self.block_size, self.scale, self.window)  # fmt: skip

    def covered(self) -> torch.Tensor:  # [T] bool, rows of q some sequence owns
        rows = torch.zeros(self.q.shape[0], dtype=torch.bool)
        qs = self.query_starts.tolist()
        for b in range(self.num_seqs):
            rows[qs[b] : qs[b + 1]] = True
        return rows.to(DEVICE)


def make_case(q_lens, ctx_lens, heads, kv_heads, head_dim, dtype, block_size=16, window=None, seed=0,
              fused_qkv=False, pad_seqs=2, pad_rows=0, first_row=0):  # fmt: skip
    """q_lens/ctx_lens per sequence (ctx after this step's write; q_len <= ctx, or 0).
    pad_seqs: metadata rows past num_seqs (junk); pad_rows / first_row: rows of q no
    sequence covers, after and before the batch."""
    gen = torch.Generator().manual_seed(seed)
    need = [math.ceil(c / block_size) for c in ctx_lens]
    num_blocks = sum(need) + NAN_BLOCKS
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    nan_ids = perm[sum(need) :]
    shape = (num_blocks * block_size, kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    max_seqs = len(ctx_lens) + pad_seqs
    max_blocks = max(need + [1]) + 1
    tables = torch.tensor(nan_ids * (max_seqs * max_blocks), dtype=torch.int32)[: max_seqs * max_blocks]
    tables = tables.view(max_seqs, max_blocks).clone()  # padding entries: NaN blocks
    dense_k, dense_v, at = [], [], 0
    for b, (n, ctx) in enumerate(zip(need, ctx_lens)):
        ids = perm[at : at + n]
        at += n
        tables[b, :n] = torch.tensor(ids, dtype=torch.int32)
        kd = torch.randn(ctx, kv_heads, head_dim, generator=gen).to(dtype)
        vd = torch.randn(ctx, kv_heads, head_dim, generator=gen).to(dtype)
        pos = torch.arange(ctx)
        rows = torch.tensor(ids, dtype=torch.long)[pos // block_size] * block_size + pos % block_size
        k_cache[rows], v_cache[rows] = kd, vd
        dense_k.append(kd.to(DEVICE))
        dense_v.append(vd.to(DEVICE))
    starts = [first_row]
    for n in q_lens:
        starts.append(starts[-1] + n)
    num_tokens = starts[-1] + pad_rows
    starts += [starts[-1] + 7] * pad_seqs  # junk past num_seqs
    ctx_all = list(ctx_lens) + [5] * pad_seqs  # junk past num_seqs
    width = (heads + 2 * kv_heads) * head_dim if fused_qkv else heads * head_dim
    x = torch.randn(num_tokens, width, generator=gen).to(dtype).to(DEVICE)
    q = x[:, : heads * head_dim].view(num_tokens, heads, head_dim)  # a view of fused qkv: token stride `width`
    return Case(
        q, k_cache.to(DEVICE), v_cache.to(DEVICE), tables.to(DEVICE),
        torch.tensor(ctx_all, dtype=torch.int32, device=DEVICE), torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        len(ctx_lens), max(q_lens + [0]), block_size, head_dim**-0.5, window, dense_k, dense_v,
    )  # fmt: skip


def run(c: Case, **kw) -> torch.Tensor:
    out = torch.full(c.q.shape, float("nan"), dtype=c.q.dtype, device=DEVICE)  # poison
    res = paged_attention(*c.args, out=out, **kw)
    assert res is out
    return out


def check(c: Case, got: torch.Tensor) -> None:
    q, k, v = c.q.float(), c.k_cache.float(), c.v_cache.float()
    want = torch.full(q.shape, float("nan"), device=DEVICE)
    paged_attention_ref(q, k, v, *c.args[3:], out=want)  # fp32 math on the same (rounded) inputs
    rows = c.covered()
    assert want[rows].isfinite().all()  # the reference read no poison either
    atol, rtol = TOL[c.q.dtype]
    torch.testing.assert_close(got[rows].float(), want[rows], atol=atol, rtol=rtol)
    assert got[~rows].isnan().all()  # rows no sequence covers: not written


def dense_oracle(c: Case) -> torch.Tensor:
    """Per query, per head, softmax over its allowed keys in float64, from the dense contexts."""
    out = torch.zeros(c.q.shape, dtype=torch.float64, device=DEVICE)
    heads, kv_heads = c.q.shape[1], c.k_cache.shape[1]
    qs = c.query_starts.tolist()
    for b in range(c.num_seqs):
        s, e, ctx = qs[b], qs[b + 1], c.dense_k[b].shape[0]
        for i, tok in enumerate(range(s, e)):
            p = ctx - (e - s) + i
            lo = 0 if c.window is None else max(0, p - c.window + 1)
            for h in range(heads):
                kh = c.dense_k[b][lo : p + 1, h // (heads // kv_heads)].double()  # [keys, D]
                vh = c.dense_v[b][lo : p + 1, h // (heads // kv_heads)].double()
                w = torch.softmax(kh @ c.q[tok, h].double() * c.scale, dim=0)
                out[tok, h] = w @ vh
    return out


# (q_lens, ctx_lens, heads, kv_heads, head_dim, block_size, window)
LAYOUTS = {
    # decode rows of different lengths, one a single token, one exactly a block
    "decode_g4_d128": ([1, 1, 1, 1, 1], [1, 17, 300, 16, 65], 8, 2, 128, 16, None),
    # a first chunk ending mid-block, an empty sequence (ctx 20, nothing new) and an unused
    # row (ctx 0) in the middle, a chunk starting mid-context (5 of 100), decode rows
    "mixed_g8_d80": ([1, 37, 0, 1, 0, 5, 16], [40, 37, 20, 1, 0, 100, 33], 8, 1, 80, 16, None),
    # MHA, sliding window shorter and longer than the chunks, cache blocks wider than BLOCK_N
    "window_g1_d96": ([3, 50, 1, 9], [3, 120, 90, 140], 3, 3, 96, 128, 24),
    # prefill only over 5-token blocks: tables gathered at an odd block size
    "prefill_g4_d64": ([23, 70], [23, 81], 4, 1, 64, 5, None),
    # a group of 7 (Qwen2-7B: 28 / 4): 9 tokens × 7 heads a tile, the 64th row padding
    "mixed_g7_d128": ([20, 1, 1, 0], [45, 64, 200, 0], 7, 1, 128, 16, None),
    # decode rows of a group of 8 under a window, 32-token blocks
    "decode_g8_d64_window": ([1, 1, 1], [200, 31, 77], 16, 2, 64, 32, 50),
}


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_ref(layout, dtype):
    q_lens, ctx_lens, heads, kv_heads, d, bs, window = LAYOUTS[layout]
    c = make_case(q_lens, ctx_lens, heads, kv_heads, d, dtype, bs, window, seed=len(layout))
    check(c, run(c))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ref_matches_dense_oracle(dtype):
    # the paged Semantics, pinned without block tables: causal, window, GQA, chunked prefill
    c = make_case([1, 6, 0, 3], [9, 6, 4, 14], 4, 2, 16, dtype, block_size=4, window=5, seed=3)
    want = dense_oracle(c)
    got = paged_attention_ref(c.q.float(), c.k_cache.float(), c.v_cache.float(), *c.args[3:])
    rows = c.covered()
    torch.testing.assert_close(got[rows], want[rows].float(), atol=1e-5, rtol=1e-5)
    c.window = None
    torch.testing.assert_close(
        paged_attention_ref(c.q.float(), c.k_cache.float(), c.v_cache.float(), *c.args[3:])[rows],
        dense_oracle(c)[rows].float(), atol=1e-5, rtol=1e-5,
    )  # fmt: skip


def test_long_contexts():
    # a 2k decode row, a 300-token chunk at the end of a 2000-token context, one KV head
    c = make_case([1, 300, 1], [2047, 2000, 1], 4, 1, 64, torch.bfloat16, seed=4)
    check(c, run(c))


def test_long_window_skips_to_the_window():
    # keys before the window are NaN in the cache: the loop must start at the window's tile
    c = make_case([1, 40], [1500, 1800], 2, 1, 128, torch.float16, window=100, seed=5)
    for b, (ctx, q_len) in enumerate([(1500, 1), (1800, 40)]):
        pos = torch.arange(ctx - q_len - 100 + 1)  # keys before the first query's window
        bs = c.block_size
        rows = c.block_tables[b, pos // bs].long().cpu() * bs + pos % bs
        c.k_cache[rows.to(DEVICE)] = float("nan")
        c.v_cache[rows.to(DEVICE)] = float("nan")
    got = run(c)
    q, k, v = c.q.float(), c.k_cache.float(), c.v_cache.float()
    want = paged_attention_ref(q, k.nan_to_num(), v.nan_to_num(), *c.args[3:])  # masked keys, never read
    atol, rtol = TOL[torch.float16]
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=rtol)


def test_strided_q_from_fused_qkv():
    c = make_case([1, 19, 1], [33, 19, 8], 8, 2, 96, torch.bfloat16, seed=6, fused_qkv=True)
    assert not c.q.is_contiguous() and c.q.stride() == ((8 + 4) * 96, 96, 1)
    check(c, run(c))


def test_rows_outside_every_sequence_are_untouched():
    # rows 0-2 before the first sequence and 4 after the last: out keeps its sentinel
    c = make_case([2, 1, 0], [9, 30, 0], 4, 2, 64, torch.float32, seed=7, pad_rows=4, first_row=3)
    out = torch.full(c.q.shape, 123.0, device=DEVICE)
    paged_attention(*c.args, out=out)
    rows = c.covered()
    assert torch.equal(out[~rows], torch.full_like(out[~rows], 123.0)) and (~rows).sum() == 7
    check(c, torch.where(rows[:, None, None], out, float("nan")))


@pytest.mark.parametrize("num_splits", [2, 4])
def test_decode_splits_match_and_are_deterministic(num_splits):
    # flash-decoding: splits longer and shorter than a sequence's key tiles, an empty row
    c = make_case([1, 1, 0, 1], [700, 3, 9, 130], 8, 1, 128, torch.bfloat16, seed=8)
    first = run(c, num_splits=num_splits)
    check(c, first)
    assert torch.equal(first, run(c, num_splits=num_splits))
    torch.testing.assert_close(first, run(c, num_splits=1), atol=1e-2, rtol=1e-2, equal_nan=True)


def test_split_rule_uses_host_ints_only():
    # (programs = seqs × KVH, max_query_len, the tables' longest context, SMs): an H200 has 132
    assert _num_splits(1 * 8, 1, 8192, 132) == MAX_SPLITS  # one long decode row: spread it
    assert _num_splits(8 * 8, 1, 8192, 132) == 8  # 64 programs: 8 splits make 512 >= 2 an SM
    assert _num_splits(64 * 8, 1, 8192, 132) == 1  # the batch already fills the GPU
    assert _num_splits(1 * 8, 1, 512, 132) == 2  # short tables: >= 4 key tiles a split
    assert _num_splits(1 * 8, 2, 8192, 132) == 1  # prefill or mixed steps: never split
    assert _num_splits(1 * 8, 1, 8192, 0) == 1  # not a GPU


def test_nothing_to_do():
    c = make_case([1, 2], [4, 2], 2, 1, 64, torch.float16, seed=9)
    for num_seqs, max_q in [(0, 2), (2, 0)]:
        out = torch.full(c.q.shape, 5.0, dtype=torch.float16, device=DEVICE)
        args = list(c.args)
        args[6], args[7] = num_seqs, max_q
        assert torch.equal(paged_attention(*args, out=out), torch.full_like(out, 5.0))


def test_rejects_bad_inputs():
    c = make_case([1, 2], [4, 2], 4, 2, 64, torch.float32, seed=10)
    q, k, v, bt, cl, qs = c.args[:6]
    rest = c.args[6:]
    bad = [
        (q.transpose(1, 2), k, v, bt, cl, qs),  # D not the unit-stride dim (and mismatched)
        (q, k.half(), v, bt, cl, qs),  # dtype differs from q
        (q, k.new_zeros(k.shape[0], 3, 64), v.new_zeros(k.shape[0], 3, 64), bt, cl, qs),  # 4 heads, 3 KV heads
        (q, k.transpose(0, 1).contiguous().transpose(0, 1), v, bt, cl, qs),  # not contiguous
        (q, k[:-1], v[:-1], bt, cl, qs),  # not whole blocks
        (q, k, v, bt.long(), cl, qs),
        (q, k, v, bt, cl[:-1], qs),
        (q, k, v, bt, cl, qs[:-1]),
    ]
    for args in bad:
        with pytest.raises((ValueError, TypeError)):
            paged_attention(*args, *rest)
    with pytest.raises(ValueError):
        paged_attention(*c.args, out=torch.empty(q.shape, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError):
        paged_attention(*c.args, num_splits=2)  # max_query_len is 2: splits serve decode only
    with pytest.raises(ValueError):
        paged_attention(q, k, v, bt, cl, qs, bt.shape[0] + 1, *rest[1:])  # more sequences than rows


@pytest.mark.gpu
def test_launch_never_syncs():
    c = make_case([1] * 16, [100 + 37 * i for i in range(16)], 32, 8, 128, torch.bfloat16, seed=11)
    run(c)  # compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = run(c)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check(c, got)


@pytest.mark.gpu
@pytest.mark.parametrize("decode", [True, False])
def test_cuda_graph_replay_with_new_contents(decode):
    # capture once, then rewrite every metadata buffer (lengths, tables, starts) and the
    # cache in place: the replay follows the new contents
    q_lens = [1] * 6 if decode else [1, 40, 0, 7, 1, 12]
    a = make_case(q_lens, [50, 300, 9, 120, 64, 900], 32, 8, 128, torch.bfloat16, seed=12, pad_rows=3)
    b = make_case(q_lens[::-1], [700, 5, 64, 33, 400, 12], 32, 8, 128, torch.bfloat16, seed=13, pad_rows=3)
    # same shapes: pad b's buffers to a's
    assert a.q.shape == b.q.shape
    assert a.k_cache.shape[0] >= b.k_cache.shape[0] and a.block_tables.shape[1] >= b.block_tables.shape[1]
    out = torch.full(a.q.shape, float("nan"), dtype=a.q.dtype, device=DEVICE)
    splits = 4 if decode else 1
    paged_attention(*a.args, out=out, num_splits=splits)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_attention(*a.args, out=out, num_splits=splits)
    out.fill_(float("nan"))
    graph.replay()
    check(a, out)
    # rewrite a's buffers with b's contents
    a.q.copy_(b.q)
    rows = b.k_cache.shape[0]
    for dst, src in ((a.k_cache, b.k_cache), (a.v_cache, b.v_cache)):
        dst.fill_(float("nan"))
        dst[:rows] = src
    a.block_tables.fill_(int(b.block_tables[0, -1]))  # a NaN block of b
    a.block_tables[:, : b.block_tables.shape[1]] = b.block_tables
    a.context_lens.copy_(b.context_lens)
    a.query_starts.copy_(b.query_starts)
    b.k_cache, b.v_cache, b.block_tables, b.q = a.k_cache, a.v_cache, a.block_tables, a.q
    out.fill_(float("nan"))
    graph.replay()
    check(b, out)
