"""paged_attention: causal attention of a packed varlen batch (prefill chunks and decode
rows in one call) over a paged KV cache, K/V read in place (no gather, no GQA repeat).

`paged_attention_ref` is the Semantics (a plain per-sequence loop) and the tests'
oracle; `paged_attention` is the Triton launcher. server/model/attention.py's
`paged_attention_torch` is the CPU path; this file knows nothing about the engine, the
block manager or which backend a step uses.

Kernel layout: one program per (sequence) × (KV head) × (tile of BLOCK_Q query tokens)
[× context split]. A program serves its KV head's whole query-head group: the M
dimension of its tile packs (query token, head of the group) as m = token * G + g, so a
decode row of a group of 4 or 8 heads is already a 4- or 8-row dot, and each K/V tile is
loaded once for all G heads. It walks the key positions its queries can see, from the
sliding window's first BLOCK_N tile up to its last query's position, with an online
softmax in fp32 (exp2, the scale folded into log2 units). Keys are gathered row by row
through the block table, so BLOCK_N need not match the cache's block size; table
entries and cache rows outside [window start, last query] are never read.

The grid depends only on host integers (num_seqs, KVH, max_query_len, the block sizes,
the split count) and the launcher reads no device tensor back: a launch captured in a
CUDA graph is valid on replay for any contents of the same buffers. Programs whose query
tile starts past their sequence's query length exit at once, as do empty sequences.
Pure decode steps (max_query_len == 1) may split each context into NUM_SPLITS ranges
(flash-decoding); the partial (max, sum, accumulator) triples are merged by a second
kernel in a fixed order (no float atomics), so results are deterministic.

What it does not do: write K/V into the cache (the caller did, before the call), write
rows of q that no sequence covers, or check device values (context_lens >= q lengths,
block ids in range) — those are the caller's invariants.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Query rows (tokens × group heads) of a prefill tile. Reasoned, not yet measured on a GPU:
# 64 rows × D=128 fp32 accumulator is 64 registers a thread over 4 warps, and each K/V
# tile is reused by 64 rows, enough to move prefill off the memory roof.
PREFILL_BLOCK_M = 64
# Keys per tile: 64 keys × D=128 × 2 B = 16 KiB each of K and V per step, a few stages in
# shared memory with room for two programs an SM. Reasoned, not yet measured on a GPU.
BLOCK_N = 64
MAX_SPLITS = 16  # flash-decoding splits per context; the merge loads them all as one tile
MIN_TILES_PER_SPLIT = 4  # keep each split's loop long enough to hide its load latency


@triton.jit
def _paged_attention_kernel(
    q_ptr,  # [T, H, D], strides (stride_qt, stride_qh, 1)
    k_ptr,  # [num_blocks * PAGE, KVH, D] contiguous
    v_ptr,  # same
    out_ptr,  # [T, H, D] contiguous (NUM_SPLITS == 1)
    part_ptr,  # [num_seqs, H, NUM_SPLITS, BLOCK_D] fp32 unnormalised accumulators (NUM_SPLITS > 1)
    ml_ptr,  # [num_seqs, H, NUM_SPLITS, 2] fp32 (running max in log2 units, sum) (NUM_SPLITS > 1)
    tables_ptr,  # [max_seqs, max_blocks] int32, row stride stride_bt
    ctx_ptr,  # [max_seqs] int32
    qstart_ptr,  # [max_seqs + 1] int32
    stride_qt,
    stride_qh,
    stride_bt,
    qk_scale,  # softmax scale × log2(e)
    window,  # sliding window W (unused unless HAS_WINDOW)
    num_q_tiles,
    NUM_HEADS: tl.constexpr,  # H
    KV_HEADS: tl.constexpr,  # KVH
    GROUP: tl.constexpr,  # G = H // KVH
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # next power of two >= D
    BLOCK_Q: tl.constexpr,  # query tokens per tile
    BLOCK_M: tl.constexpr,  # next power of two >= max(16, BLOCK_Q * G)
    BLOCK_N: tl.constexpr,  # keys per tile
    PAGE: tl.constexpr,  # cache block size
    NUM_SPLITS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    DOT_FP32: tl.constexpr,  # fp32 dots ("ieee"): fp32 inputs, or bf16 in the interpreter
):
    pid = tl.program_id(0)  # q tile (heaviest first) × split
    kvh = tl.program_id(1)
    seq = tl.program_id(2)
    split = pid % NUM_SPLITS
    q_tile = num_q_tiles - 1 - pid // NUM_SPLITS  # last tiles see the most keys: schedule them first
    q_begin = tl.load(qstart_ptr + seq)
    q_len = tl.load(qstart_ptr + seq + 1) - q_begin
    ctx = tl.load(ctx_ptr + seq)
    tok_lo = q_tile * BLOCK_Q
    if (tok_lo >= q_len) | (ctx <= 0):
        return

    offs_m = tl.arange(0, BLOCK_M)  # [BM] row m = (token m // G, head kvh * G + m % G)
    tok = tok_lo + offs_m // GROUP  # [BM] query index in the sequence
    head = kvh * GROUP + offs_m % GROUP  # [BM]
    m_valid = (offs_m < BLOCK_Q * GROUP) & (tok < q_len)
    pos = ctx - q_len + tok  # [BM] absolute position of each query
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM

    # keys this tile can see: [k_lo, k_hi)
    tok_hi = tl.minimum(tok_lo + BLOCK_Q, q_len) - 1
    k_hi = ctx - q_len + tok_hi + 1
    k_lo = 0
    if HAS_WINDOW:
        k_lo = tl.maximum(ctx - q_len + tok_lo - window + 1, 0)
    first = (k_lo // BLOCK_N) * BLOCK_N  # the window's first key tile
    n_tiles = tl.cdiv(k_hi - first, BLOCK_N)
    if NUM_SPLITS > 1:
        per_split = tl.cdiv(n_tiles, NUM_SPLITS)
        first = first + split * per_split * BLOCK_N
        stop = tl.minimum(first + per_split * BLOCK_N, k_hi)
    else:
        stop = k_hi

    q_rows = (q_begin + tok).to(tl.int64)  # [BM] rows of q and out
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=m_valid[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BM, BD]
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table_row = tables_ptr + seq.to(tl.int64) * stride_bt
    row_stride = KV_HEADS * HEAD_DIM
    for start in range(first, stop, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)  # [BN] key positions
        n_valid = (offs_n >= k_lo) & (offs_n < stop)
        block = tl.load(table_row + offs_n // PAGE, mask=n_valid, other=0)
        kv_rows = block.to(tl.int64) * PAGE + offs_n % PAGE  # [BN] cache rows
        kv_offs = kv_rows * row_stride + kvh * HEAD_DIM  # [BN]
        k = tl.load(k_ptr + kv_offs[None, :] + offs_d[:, None], mask=d_mask[:, None] & n_valid[None, :], other=0.0)  # [BD, BN]
        v = tl.load(v_ptr + kv_offs[:, None] + offs_d[None, :], mask=n_valid[:, None] & d_mask[None, :], other=0.0)  # [BN, BD]
        if DOT_FP32:
            s = tl.dot(q, k.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = s * qk_scale  # [BM, BN], log2 units
        allowed = n_valid[None, :] & (offs_n[None, :] <= pos[:, None])
        if HAS_WINDOW:
            allowed = allowed & (offs_n[None, :] > pos[:, None] - window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: exp2(-inf) = 0, not NaN
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DOT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if NUM_SPLITS > 1:  # decode: BLOCK_Q = 1, row m is head kvh * G + m
        slot = (seq.to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS + split  # [BM]
        tl.store(part_ptr + slot[:, None] * BLOCK_D + offs_d[None, :], acc, mask=m_valid[:, None])
        tl.store(ml_ptr + slot * 2, m_i, mask=m_valid)
        tl.store(ml_ptr + slot * 2 + 1, l_i, mask=m_valid)
    else:
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        out_offs = (q_rows[:, None] * NUM_HEADS + head[:, None]) * HEAD_DIM + offs_d[None, :]
        tl.store(out_ptr + out_offs, o.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & d_mask[None, :])


@triton.jit
def _merge_splits_kernel(
    out_ptr,  # [T, H, D] contiguous
    part_ptr,  # [num_seqs, H, NUM_SPLITS, BLOCK_D] fp32
    ml_ptr,  # [num_seqs, H, NUM_SPLITS, 2] fp32
    ctx_ptr,  # [max_seqs] int32
    qstart_ptr,  # [max_seqs + 1] int32
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    """Decode rows: out[row, h] = Σ_s 2^(m_s - M) acc_s / Σ_s 2^(m_s - M) l_s, over the
    splits in a fixed order."""
    h = tl.program_id(0)
    seq = tl.program_id(1)
    q_begin = tl.load(qstart_ptr + seq)
    if (tl.load(qstart_ptr + seq + 1) - q_begin < 1) | (tl.load(ctx_ptr + seq) <= 0):
        return
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    slot = (seq.to(tl.int64) * NUM_HEADS + h) * NUM_SPLITS + offs_s  # [S]
    m_s = tl.load(ml_ptr + slot * 2)  # [S]; -inf for a split that saw no key
    l_s = tl.load(ml_ptr + slot * 2 + 1)
    m_all = tl.max(m_s, axis=0)
    w = tl.exp2(m_s - tl.where(m_all == float("-inf"), 0.0, m_all))  # [S]
    acc = tl.load(part_ptr + slot[:, None] * BLOCK_D + offs_d[None, :])  # [S, BD]
    num = tl.sum(acc * w[:, None], axis=0)  # [BD]
    den = tl.sum(l_s * w, axis=0)
    o = num / tl.where(den == 0.0, 1.0, den)
    out_offs = (q_begin.to(tl.int64) * NUM_HEADS + h) * HEAD_DIM + offs_d
    tl.store(out_ptr + out_offs, o.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


def _blocks(max_query_len: int, group: int, head_dim: int, elt: int) -> tuple[int, int, int]:
    """(BLOCK_Q, BLOCK_M, num_warps) from host ints. Reasoned, not yet measured on a GPU
    (bench/paged_attention.py reports the numbers to tune them by)."""
    if max_query_len == 1:
        # Decode: one token, the group's G heads are the tile's rows (16 at least: the
        # smallest M of a tensor-core dot); K/V bytes are the whole cost.
        block_q = 1
    else:
        # Prefill or mixed: ~64 rows of (token, head); a batch of short chunks takes a
        # smaller tile (power-of-two buckets of max_query_len, few compiled variants).
        block_q = max(1, PREFILL_BLOCK_M // group)
        block_q = min(block_q, triton.next_power_of_2(max_query_len))
    block_m = max(16, triton.next_power_of_2(block_q * group))
    # fp32 K/V tiles are twice the bytes of 16-bit ones: 8 warps keep the per-thread share.
    num_warps = 8 if block_m * head_dim * elt >= 64 * 128 * 4 else 4
    return block_q, block_m, num_warps


def _num_splits(programs: int, max_query_len: int, max_context: int, sms: int) -> int:
    """Flash-decoding splits for a pure decode step whose (sequence, KV head) programs
    would leave SMs idle (sms = 0: not a GPU, no splits): double until 2 programs an SM,
    keeping >= MIN_TILES_PER_SPLIT key tiles a split at the longest context the block
    tables can name (a host bound: the real lengths live on the device). Reasoned, not
    yet measured on a GPU."""
    if max_query_len != 1:
        return 1
    splits = 1
    while (
        splits < MAX_SPLITS
        and programs * splits < 2 * sms
        and max_context >= 2 * splits * MIN_TILES_PER_SPLIT * BLOCK_N
    ):
        splits *= 2
    return splits


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def paged_attention(
    q: torch.Tensor,  # [T, H, D], unit stride along D (token and head strides arbitrary)
    k_cache: torch.Tensor,  # [num_blocks * block_size, KVH, D] contiguous, one layer's keys
    v_cache: torch.Tensor,  # same shape, values
    block_tables: torch.Tensor,  # [max_seqs, max_blocks] int32, unit column stride
    context_lens: torch.Tensor,  # [max_seqs] int32, after this step's K/V write
    query_starts: torch.Tensor,  # [max_seqs + 1] int32
    num_seqs: int,
    max_query_len: int,
    block_size: int,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,  # [T, H, D] contiguous, q's dtype; allocated if None
    *,
    num_splits: int | None = None,  # context splits for a decode step (None: chosen from host ints)
) -> torch.Tensor:  # [T, H, D]
    """Triton `paged_attention_ref`: same Semantics. Rows of `out` that no sequence
    0..num_seqs-1 covers are left as they were (uninitialised if `out` is None).
    Requires context_lens[b] >= q_len(b) and q_len(b) <= max_query_len (not checked:
    device values are never read)."""
    if q.dim() != 3 or q.stride(2) != 1:
        raise ValueError(f"q must be [T, H, D] with unit stride along D, got {tuple(q.shape)} strides {q.stride()}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"q dtype {q.dtype} not supported (fp32, bf16, fp16)")
    num_tokens, num_heads, head_dim = q.shape
    if k_cache.dim() != 3 or k_cache.shape != v_cache.shape or k_cache.shape[2] != head_dim:
        raise ValueError(f"k_cache and v_cache must both be [rows, KVH, {head_dim}], got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    for c in (k_cache, v_cache):
        if c.dtype != q.dtype or c.device != q.device or not c.is_contiguous():
            raise ValueError("k_cache and v_cache must be contiguous, of q's dtype and device")
    kv_heads = k_cache.shape[1]
    if kv_heads == 0 or num_heads % kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {kv_heads} KV heads")
    if not 16 <= head_dim <= 256:
        raise ValueError(f"head_dim {head_dim} not supported (16..256)")
    if block_size < 1 or k_cache.shape[0] % block_size:
        raise ValueError(f"cache rows {k_cache.shape[0]} are not whole blocks of {block_size}")
    if block_tables.dim() != 2 or block_tables.dtype != torch.int32 or block_tables.stride(1) != 1:
        raise ValueError("block_tables must be [max_seqs, max_blocks] int32 with unit column stride")
    max_seqs = block_tables.shape[0]
    if context_lens.shape != (max_seqs,) or context_lens.dtype != torch.int32 or not context_lens.is_contiguous():
        raise ValueError(f"context_lens must be contiguous int32 [{max_seqs}]")
    if query_starts.shape != (max_seqs + 1,) or query_starts.dtype != torch.int32 or not query_starts.is_contiguous():
        raise ValueError(f"query_starts must be contiguous int32 [{max_seqs + 1}]")
    if any(t.device != q.device for t in (block_tables, context_lens, query_starts)):
        raise ValueError("block_tables, context_lens and query_starts must be on q's device")
    if not 0 <= num_seqs <= max_seqs or max_query_len < 0:
        raise ValueError(f"num_seqs {num_seqs} must be in 0..{max_seqs}, max_query_len {max_query_len} >= 0")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    if out is None:
        out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {q.dtype} {tuple(q.shape)} on q's device")
    if num_seqs == 0 or max_query_len == 0 or num_tokens == 0:
        return out

    group = num_heads // kv_heads
    block_d = triton.next_power_of_2(head_dim)
    block_q, block_m, num_warps = _blocks(max_query_len, group, head_dim, q.element_size())
    num_q_tiles = triton.cdiv(max_query_len, block_q)
    if num_splits is None:
        max_context = block_tables.shape[1] * block_size
        num_splits = _num_splits(num_seqs * kv_heads, max_query_len, max_context, _sm_count(q.device))
    if num_splits < 1 or num_splits > MAX_SPLITS or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two in 1..{MAX_SPLITS}, got {num_splits}")
    if num_splits > 1 and max_query_len != 1:
        raise ValueError("context splits serve pure decode steps only (max_query_len == 1)")
    part = ml = out  # unused unless split
    if num_splits > 1:
        part = torch.empty(num_seqs, num_heads, num_splits, block_d, dtype=torch.float32, device=q.device)
        ml = torch.empty(num_seqs, num_heads, num_splits, 2, dtype=torch.float32, device=q.device)
    grid = (num_q_tiles * num_splits, kv_heads, num_seqs)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, part, ml, block_tables, context_lens, query_starts,
        q.stride(0), q.stride(1), block_tables.stride(0),
        scale * LOG2E, sliding_window or 0, num_q_tiles,
        NUM_HEADS=num_heads, KV_HEADS=kv_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=BLOCK_N, PAGE=block_size, NUM_SPLITS=num_splits,
        HAS_WINDOW=sliding_window is not None,
        # 16-bit inputs take the native tensor-core dot (fp32 sums); Triton's CPU
        # interpreter multiplies bf16 bit patterns (triton-lang/triton#11584)
        DOT_FP32=q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and q.device.type != "cuda"),
        num_warps=num_warps,
    )  # fmt: skip
    if num_splits > 1:
        _merge_splits_kernel[(num_heads, num_seqs)](
            out, part, ml, context_lens, query_starts,
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=num_splits, num_warps=4,
        )  # fmt: skip
    return out


def paged_attention_ref(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [num_blocks * block_size, KVH, D]
    v_cache: torch.Tensor,  # same shape
    block_tables: torch.Tensor,  # [max_seqs, max_blocks] int32
    context_lens: torch.Tensor,  # [max_seqs] int32
    query_starts: torch.Tensor,  # [max_seqs + 1] int32
    num_seqs: int,
    max_query_len: int,
    block_size: int,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,  # [T, H, D]; allocated (zeros) if None
) -> torch.Tensor:  # [T, H, D], q's dtype
    """Semantics:

        G = H // KVH
        for b in range(num_seqs):
            s, e, ctx = query_starts[b], query_starts[b + 1], context_lens[b]
            q_len = e - s                       # 0 (or ctx 0): nothing written
            rows = [block_tables[b, j // block_size] * block_size + j % block_size for j in range(ctx)]
            K, V = k_cache[rows], v_cache[rows]  # [ctx, KVH, D]
            for i in range(q_len):
                p = ctx - q_len + i              # the query's position
                keys j: j <= p, and j > p - W with a sliding window W
                for h in range(H):
                    w = softmax(scale * K[keys, h // G] @ q[s + i, h])   # fp32
                    out[s + i, h] = (w @ V[keys, h // G]).to(q.dtype)

    Rows of `out` outside every sequence are left as they were. Only keys 0..ctx-1 of
    each sequence are read (table entries past ceil(ctx / block_size) never are);
    max_query_len is not needed here (it bounds the kernel's grid).
    """
    num_heads = q.shape[1]
    group = num_heads // k_cache.shape[1]
    if out is None:
        out = torch.zeros_like(q)
    starts, lens = query_starts.tolist(), context_lens.tolist()
    for b in range(num_seqs):
        s, e, ctx = starts[b], starts[b + 1], lens[b]
        q_len = e - s
        if q_len <= 0 or ctx <= 0:
            continue
        pos = torch.arange(ctx, device=q.device)
        rows = block_tables[b, pos // block_size].long() * block_size + pos % block_size  # [ctx]
        k = k_cache[rows].float().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, ctx, D]
        v = v_cache[rows].float().repeat_interleave(group, dim=1).transpose(0, 1)
        q_pos = (ctx - q_len + torch.arange(q_len, device=q.device)).unsqueeze(1)  # [q_len, 1]
        allowed = pos.unsqueeze(0) <= q_pos  # [q_len, ctx]
        if sliding_window is not None:
            allowed &= pos.unsqueeze(0) > q_pos - sliding_window
        scores = q[s:e].float().transpose(0, 1) @ k.transpose(1, 2) * scale  # [H, q_len, ctx]
        w = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        out[s:e] = (w @ v).transpose(0, 1).to(out.dtype)  # [q_len, H, D]
    return out
