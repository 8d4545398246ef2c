"""paged_attention_torch against attention written out per query, on steps that mix
decode tokens (batched in one SDPA) and prefill chunks with earlier context (one SDPA
each), over shuffled cache blocks, GQA, and a sliding window."""

import math

import pytest
import torch

from loraplex.server.model.attention import AttentionMetadata, KVCache, paged_attention_torch

HEADS, KV_HEADS, D, BLOCK = 4, 2, 8, 4


def make_step(q_lens, ctx_lens, gen, window=None, heads=HEADS, kv_heads=KV_HEADS):
    """(q [T, H, D], cache, meta) with each sequence's context in shuffled blocks; the
    new tokens' K/V already written."""
    need = [math.ceil(c / BLOCK) for c in ctx_lens]
    perm = torch.randperm(sum(need) + 3, generator=gen)
    cache = KVCache(1, len(perm), BLOCK, kv_heads, D, torch.float32, "cpu")
    cache.k[0].copy_(torch.randn(cache.k[0].shape, generator=gen))
    cache.v[0].copy_(torch.randn(cache.v[0].shape, generator=gen))
    tables, starts, k = [], [0], 0
    for n, q_len in zip(need, q_lens):
        tables.append(perm[k : k + n].clone())
        k += n
        starts.append(starts[-1] + q_len)
    rows = torch.cat([cache.rows(t, c)[c - q:] for t, c, q in zip(tables, ctx_lens, q_lens)])
    q = torch.randn(starts[-1], heads, D, generator=gen)
    return q, cache, AttentionMetadata(starts, list(ctx_lens), tables, rows, window)


def reference(q, cache, meta, scale):
    out = torch.zeros_like(q, dtype=torch.float64)
    heads, groups = q.shape[1], q.shape[1] // cache.k[0].shape[1]
    for b, ctx in enumerate(meta.context_lens):
        start, end = meta.query_starts[b], meta.query_starts[b + 1]
        rows = cache.rows(meta.block_tables[b], ctx)
        k, v = cache.k[0][rows].double(), cache.v[0][rows].double()  # [ctx, KVH, D]
        for i, tok in enumerate(range(start, end)):
            pos = ctx - (end - start) + i
            lo = 0 if meta.sliding_window is None else max(0, pos - meta.sliding_window + 1)
            for h in range(heads):
                kh, vh = k[lo : pos + 1, h // groups], v[lo : pos + 1, h // groups]
                w = torch.softmax(kh @ q[tok, h].double() * scale, dim=0)  # [keys]
                out[tok, h] = w @ vh
    return out.float()


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize(
    "q_lens,ctx_lens",
    [
        ([1, 1, 1], [9, 1, 14]),  # pure decode
        ([1, 6, 1, 1, 3], [7, 6, 1, 12, 10]),  # decode tokens beside a first chunk and a later chunk
        ([5, 2], [5, 9]),  # prefill only
        ([1, 0, 4], [3, 8, 4]),  # a sequence with no new tokens this step
    ],
)
@pytest.mark.parametrize("heads,kv_heads", [(HEADS, KV_HEADS), (4, 4), (8, 2)])  # GQA groups of 2, 1 and 4
def test_matches_per_query_attention(q_lens, ctx_lens, window, heads, kv_heads):
    gen = torch.Generator().manual_seed(sum(ctx_lens))
    q, cache, meta = make_step(q_lens, ctx_lens, gen, window, heads, kv_heads)
    got = paged_attention_torch(q, cache, 0, meta, scale=D**-0.5)
    torch.testing.assert_close(got, reference(q, cache, meta, D**-0.5), atol=1e-5, rtol=1e-5)


def test_decode_layout_is_built_once_per_step():
    q, cache, meta = make_step([1, 3, 1], [4, 3, 6], torch.Generator().manual_seed(0))
    paged_attention_torch(q, cache, 0, meta, scale=1.0)
    layout = meta.decode_layout(BLOCK, torch.device("cpu"))
    assert layout.seqs == [0, 2] and layout.q_rows.tolist() == [0, 4] and not layout.all_decode
    paged_attention_torch(q, cache, 0, meta, scale=1.0)
    assert meta.decode_layout(BLOCK, torch.device("cpu")) is layout
