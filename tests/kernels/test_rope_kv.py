"""rope_kv_write (Triton; the interpreter on CPU) against rope_kv_write_ref, and the ref
and rope_cache against the model code they replace (LlamaModel.forward's cos/sin,
DecoderLayer's rotation, KVCache.write), bit for bit.

Both caches start as NaN and some tokens are padding (slot -1): every row the step does
not own must stay NaN, every row it owns must match. Sizes stay small: on CPU every
program runs in Triton's interpreter.
"""

from dataclasses import dataclass

import pytest
import torch

from loraplex.kernels.rope_kv import rope_cache, rope_kv_write, rope_kv_write_ref, rotate_half
from loraplex.server.model.attention import KVCache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (atol, rtol). The kernel rounds where the ref rounds (each product, then the sum); for
# 16-bit dtypes the products are exact in fp32, so it should equal the ref bit for bit
# (the bound is one eps to leave room for the GPU); fp32: an FMA contraction, one ulp.
TOL = {
    torch.float32: (1e-6, 1e-6),
    torch.bfloat16: (1e-5, 2**-7),
    torch.float16: (1e-6, 2**-10),
}
CONFIGS = [(64, 4, 4), (80, 8, 2), (96, 8, 1), (128, 16, 2)]  # (head_dim, H, KVH): GQA 1, 4, 8, 8
MAX_POSITIONS = 64
BLOCK_SIZE = 16


def llama_rotate_half(x: torch.Tensor) -> torch.Tensor:
    """rotate_half as llama.py had it before rope_kv_write replaced it."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def inv_freq_of(head_dim, theta=500000.0):
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # [D/2]


@dataclass
class Case:
    qkv: torch.Tensor  # [T, (H + 2 KVH) D], row stride may exceed the width
    cos_sin: torch.Tensor  # [P, 2, D]
    positions: torch.Tensor  # [T]
    k_cache: torch.Tensor  # [N, KVH, D], NaN
    v_cache: torch.Tensor  # [N, KVH, D], NaN
    slots: torch.Tensor  # [T], -1 = padding
    heads: tuple[int, int, int]  # H, KVH, D

    def args(self, qkv=None, k_cache=None, v_cache=None):
        return (qkv if qkv is not None else self.qkv, self.cos_sin, self.positions,
                k_cache if k_cache is not None else self.k_cache,
                v_cache if v_cache is not None else self.v_cache, self.slots, *self.heads)  # fmt: skip


def make_case(num_tokens, head_dim, heads, kv_heads, dtype, seed=0, row_pad=0, index_dtype=torch.int64, padding=3):
    gen = torch.Generator().manual_seed(seed)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(num_tokens, width + row_pad, generator=gen).to(dtype).to(DEVICE)[:, :width]
    cos_sin = rope_cache(inv_freq_of(head_dim), 1.0, MAX_POSITIONS, dtype, DEVICE)
    positions = torch.randint(0, MAX_POSITIONS, (num_tokens,), generator=gen)
    num_rows = BLOCK_SIZE * (num_tokens // BLOCK_SIZE + 2)
    slots = torch.randperm(num_rows, generator=gen)[:num_tokens]
    slots[torch.randperm(num_tokens, generator=gen)[:padding]] = -1
    cache = torch.full((num_rows, kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    return Case(qkv, cos_sin, positions.to(index_dtype).to(DEVICE), cache, cache.clone(),
                slots.to(index_dtype).to(DEVICE), (heads, kv_heads, head_dim))  # fmt: skip


def check(c, got_q, got_qkv, got_k, got_v):
    """Runs the ref on copies of c's inputs and compares the kernel's results to it."""
    want_qkv, want_k, want_v = c.qkv.clone(), c.k_cache.clone(), c.v_cache.clone()
    want_q = rope_kv_write_ref(*c.args(want_qkv, want_k, want_v))
    atol, rtol = TOL[c.qkv.dtype]
    heads, kv_heads, head_dim = c.heads
    assert got_q.shape == (c.qkv.shape[0], heads, head_dim) and got_q.data_ptr() == got_qkv.data_ptr()
    torch.testing.assert_close(got_q, want_q, atol=atol, rtol=rtol)
    q_width = heads * head_dim
    assert torch.equal(got_qkv[:, q_width:], c.qkv[:, q_width:])  # k and v columns untouched
    torch.testing.assert_close(got_k, want_k, atol=atol, rtol=rtol, equal_nan=True)
    torch.testing.assert_close(got_v, want_v, atol=0, rtol=0, equal_nan=True)  # v: a copy
    owned = torch.zeros(got_k.shape[0], dtype=torch.bool, device=DEVICE)
    owned[c.slots[c.slots >= 0].long()] = True
    for cache in (got_k, got_v):
        assert cache[~owned].isnan().all() and not cache[owned].isnan().any()


def run(c):
    qkv = torch.empty_like(c.qkv).copy_(c.qkv) if c.qkv.is_contiguous() else c.qkv.clone()
    if not c.qkv.is_contiguous():  # keep the row stride: copy into a buffer as wide as the original
        wide = torch.empty(c.qkv.shape[0], c.qkv.stride(0), dtype=c.qkv.dtype, device=DEVICE)
        qkv = wide[:, : c.qkv.shape[1]].copy_(c.qkv)
        assert qkv.stride(0) == c.qkv.stride(0)
    k, v = c.k_cache.clone(), c.v_cache.clone()
    return rope_kv_write(*c.args(qkv, k, v)), qkv, k, v


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("head_dim,heads,kv_heads", CONFIGS)
def test_matches_ref(dtype, head_dim, heads, kv_heads):
    c = make_case(13, head_dim, heads, kv_heads, dtype, seed=head_dim)
    check(c, *run(c))


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_strided_qkv_and_index_dtypes(index_dtype):
    # qkv a slice of a wider buffer; positions and slots int32 or int64; no padding rows
    c = make_case(21, 128, 8, 1, torch.bfloat16, seed=1, row_pad=40, index_dtype=index_dtype, padding=0)
    assert c.qkv.stride(0) == 10 * 128 + 40
    check(c, *run(c))


def test_all_padding():
    c = make_case(5, 64, 4, 4, torch.float16, seed=2, padding=5)
    _, qkv, k, v = run(c)
    assert k.isnan().all() and v.isnan().all()  # nothing written
    check(c, *run(c))


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
@pytest.mark.parametrize("scaling", [1.0, 0.7])
def test_rope_cache_rows_are_todays_per_step_rows(head_dim, scaling):
    # LlamaModel.forward computes cos/sin for the step's positions; rows of the table for
    # arange(max_positions) must be bit-identical, for prefill and decode-like positions
    inv_freq = inv_freq_of(head_dim)
    max_positions = 8192
    gen = torch.Generator().manual_seed(head_dim)
    steps = [torch.arange(2049), torch.randint(0, max_positions, (37,), generator=gen), torch.tensor([max_positions - 1])]
    for dtype in TOL:
        table = rope_cache(inv_freq, scaling, max_positions, dtype, "cpu")
        assert table.shape == (max_positions, 2, head_dim) and table.dtype == dtype
        for positions in steps:
            freqs = positions.float().unsqueeze(1) * inv_freq.unsqueeze(0)  # [T, D/2]
            emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
            cos = (emb.cos() * scaling).to(dtype).unsqueeze(1)  # [T, 1, D]
            sin = (emb.sin() * scaling).to(dtype).unsqueeze(1)
            assert torch.equal(table[positions, 0].unsqueeze(1), cos)
            assert torch.equal(table[positions, 1].unsqueeze(1), sin)


@pytest.mark.parametrize("dtype", list(TOL))
def test_ref_is_todays_model_code(dtype):
    # LlamaModel.forward's cos/sin, DecoderLayer's rotation and KVCache.write, bit for bit
    heads, kv_heads, head_dim = 8, 2, 80
    num_tokens, num_blocks = 19, 3
    gen = torch.Generator().manual_seed(3)
    inv_freq = inv_freq_of(head_dim).to(DEVICE)
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype).to(DEVICE)
    positions = torch.cat([torch.arange(15), torch.tensor([3, 40, 7, 61])]).to(DEVICE)  # a prefill, 4 decodes
    slot_mapping = torch.randperm(num_blocks * BLOCK_SIZE, generator=gen)[:num_tokens].to(DEVICE)  # int64

    freqs = positions.float().unsqueeze(1) * inv_freq.unsqueeze(0)  # today's step
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * 1.0).to(dtype).unsqueeze(1)
    sin = (emb.sin() * 1.0).to(dtype).unsqueeze(1)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.reshape(-1, heads, head_dim)
    k = k.reshape(-1, kv_heads, head_dim)
    v = v.reshape(-1, kv_heads, head_dim)
    q = q * cos + llama_rotate_half(q) * sin
    k = k * cos + llama_rotate_half(k) * sin
    cache = KVCache(1, num_blocks, BLOCK_SIZE, kv_heads, head_dim, dtype, DEVICE)
    cache.k[0].index_copy_(0, slot_mapping, k)  # KVCache.write as it was
    cache.v[0].index_copy_(0, slot_mapping, v.contiguous())

    new = KVCache(1, num_blocks, BLOCK_SIZE, kv_heads, head_dim, dtype, DEVICE)
    table = rope_cache(inv_freq, 1.0, MAX_POSITIONS, dtype, DEVICE)
    qkv2 = qkv.clone()
    got = rope_kv_write_ref(qkv2, table, positions, new.k[0], new.v[0], slot_mapping, heads, kv_heads, head_dim)
    assert got.data_ptr() == qkv2.data_ptr()
    assert torch.equal(got, q) and torch.equal(new.k[0], cache.k[0]) and torch.equal(new.v[0], cache.v[0])
    assert torch.equal(rotate_half(qkv), llama_rotate_half(qkv))


def test_no_tokens():
    c = make_case(0, 64, 4, 2, torch.bfloat16, padding=0)
    q, _, k, _ = run(c)
    assert q.shape == (0, 4, 64) and k.isnan().all()


def test_rejects_bad_inputs():
    c = make_case(4, 64, 4, 2, torch.float32, padding=0)
    qkv, cs, pos, kc, vc, slots, h, kvh, d = c.args()
    bad = [
        (qkv[:, :-1], cs, pos, kc, vc, slots, h, kvh, d),  # width is not (H + 2 KVH) D
        (qkv.t().contiguous().t(), cs, pos, kc, vc, slots, h, kvh, d),  # column stride
        (qkv, cs.half(), pos, kc, vc, slots, h, kvh, d),
        (qkv, cs[:, :1], pos, kc, vc, slots, h, kvh, d),
        (qkv, cs, pos.float(), kc, vc, slots, h, kvh, d),
        (qkv, cs, pos[:3], kc, vc, slots, h, kvh, d),
        (qkv, cs, pos, kc[:, :1], vc, slots, h, kvh, d),
        (qkv, cs, pos, kc, vc[:-1], slots, h, kvh, d),
        (qkv, cs, pos, kc, vc.transpose(1, 2).contiguous().transpose(1, 2), slots, h, kvh, d),
        (qkv, cs, pos, kc, vc, slots.to(torch.int16), h, kvh, d),
        (qkv.view(4, -1, 2)[:, :, 0].contiguous().view(4, -1), cs, pos, kc, vc, slots, h, kvh, d),  # half width
    ]
    for args in bad:
        with pytest.raises(ValueError):
            rope_kv_write(*args)
    with pytest.raises(TypeError):
        rope_kv_write(qkv.double(), cs.double(), pos, kc.double(), vc.double(), slots, h, kvh, d)


@pytest.mark.gpu
def test_cuda_graph_replay_with_new_contents():
    # Llama-3-8B decode: positions, slots and qkv rewritten between replays
    c = make_case(32, 128, 32, 8, torch.bfloat16, seed=4, padding=4)
    qkv, k, v = c.qkv.clone(), c.k_cache.clone(), c.v_cache.clone()
    rope_kv_write(*c.args(qkv, k, v))  # compile outside the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            q = rope_kv_write(*c.args(qkv, k, v))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    c2 = make_case(32, 128, 32, 8, torch.bfloat16, seed=5, padding=6)
    qkv.copy_(c2.qkv)
    c.positions.copy_(c2.positions)
    c.slots.copy_(c2.slots)
    k.fill_(float("nan"))
    v.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check(c2, q, qkv, k, v)
