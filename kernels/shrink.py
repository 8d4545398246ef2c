"""shrink: the first half of the adapter delta, t = x @ A[slot(token)]ᵀ, for many slices,
with every adapter's A read from rank pages (kernels/rank_pages.py).

`shrink_ref` is the Semantics and the CPU backend; the Triton kernel and its launcher
(`shrink`) are drop-in on CUDA. Both take an optional preallocated `out`.

Kernel layout: one program per (tile of <= BLOCK_M tokens of one slot) × (tile of
BLOCK_N rank columns) × (K split), and every program serves all slices (q|k|v) of its
tile, so each x tile is loaded once for all of them. The tile list comes from the
mapping (kernels/mapping.py); its length is a host-known bound, so the grid never
depends on the slot values and a launch captured in a CUDA graph stays valid for every
mapping of the same token count. Programs past the last tile exit at once; base-only
tiles, and rank tiles past the slot's rank, write zeros without reading A. A rank
tile's rows come from the slot's pages through the page table (one gather of page ids
per program, outside the K loop); each page is a contiguous [16, in] block. Split-K
partial sums are added in a fixed order by a second op (no float atomics). The launcher
never reads a device tensor back.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from loraplex.kernels.mapping import LoraMapping
from loraplex.kernels.rank_pages import RANK_PAGE, check_table, gather_rows, live_rows, pages_for, rows_of

MAX_SLICES_PER_LAUNCH = 3  # q|k|v, the widest fused module of the Llama family; more slices take more launches
# Bytes of A per pipeline stage (all slices): 24 KiB keeps 3 stages plus the x tile
# under ~100 KiB of shared memory, so two programs fit on an H100 SM (offline sm_90
# compile, Triton 3.9: 96 KiB for q|k|v at R 64 prefill, 64 KiB for q|k|v decode;
# tests/kernels/test_compile_sm90.py).
A_STAGE_BYTES = 24 << 10


@triton.jit
def _page_rows(table_ptr, ranks_ptr, i, slot_c, offs_n, num_slots, max_pages, in_features, PAGE: tl.constexpr):
    """(rank, [BN] element offsets of rank rows offs_n in slice i's pages) for one slot."""
    rank = tl.minimum(tl.load(ranks_ptr + i * num_slots + slot_c), max_pages * PAGE)
    page = tl.load(table_ptr + (i * num_slots + slot_c) * max_pages + offs_n // PAGE, mask=offs_n < rank, other=0)
    return rank, page.to(tl.int64) * (PAGE * in_features) + (offs_n % PAGE) * in_features


@triton.jit
def _slice_dot(acc, xt, a_ptr, row_offs, rank, offs_n, offs_k, k_mask, DOT_FP32: tl.constexpr):
    """acc [BM, BN] += xt [BM, BK] @ A[rank rows offs_n, offs_k]ᵀ, rows past `rank` never read."""
    at = tl.load(
        a_ptr + row_offs[None, :] + offs_k[:, None],
        mask=(offs_n < rank)[None, :] & k_mask[:, None],
        other=0.0,
    )  # [BK, BN]
    if DOT_FP32:
        acc += tl.dot(xt, at.to(tl.float32), input_precision="ieee")
    else:
        acc += tl.dot(xt, at)
    return acc


@triton.jit
def _shrink_kernel(
    x_ptr,  # [T, in], row stride stride_xt, unit column stride
    a0_ptr,  # [P, 16, in] contiguous rank pages, slice 0
    a1_ptr,  # [P, 16, in] slice 1 (aliases a0 when N_SLICES < 2)
    a2_ptr,  # [P, 16, in] slice 2 (aliases a0 when N_SLICES < 3)
    out_ptr,  # [SPLIT_K, N_SLICES, T, R] float32, contiguous; R = MP * 16
    table_ptr,  # [N_SLICES, S, MP] int32 page ids
    ranks_ptr,  # [N_SLICES, S] int32
    rank_scale_ptr,  # [N_SLICES, S, R] float32 (unused unless HAS_RANK_SCALE)
    sorted_tokens_ptr,  # [T] int32
    tile_slots_ptr,  # [G] int32, slot, -1 base tile, -2 empty
    tile_starts_ptr,  # [G] int32
    tile_ends_ptr,  # [G] int32
    num_tokens,  # T
    in_features,  # in
    max_pages,  # MP
    num_slots,  # S
    stride_xt,
    k_per_split,  # in-features per K split, a multiple of BLOCK_K
    N_SLICES: tl.constexpr,
    PAGE: tl.constexpr,  # rank rows per page
    HAS_RANK_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,  # fp32 x (exact "ieee" dot), or bf16 in the interpreter, which cannot dot bf16
):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)  # rank tile
    split = tl.program_id(2)
    slot = tl.load(tile_slots_ptr + tile)
    if slot == -2:  # past the last tile of this mapping
        return
    slot_c = tl.maximum(slot, 0).to(tl.int64)

    start = tl.load(tile_starts_ptr + tile)
    end = tl.load(tile_ends_ptr + tile)
    offs_m = start + tl.arange(0, BLOCK_M)  # [BM] positions in sorted_tokens
    m_mask = offs_m < end
    rows = tl.load(sorted_tokens_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)  # [BM] token ids
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] rank columns

    # each slice's rank for this slot and where its rank rows offs_n live (rows past the
    # rank are masked: never read)
    rank0, rows0 = _page_rows(table_ptr, ranks_ptr, 0, slot_c, offs_n, num_slots, max_pages, in_features, PAGE)
    rank1, rows1 = rank0, rows0
    rank2, rows2 = rank0, rows0
    if N_SLICES > 1:
        rank1, rows1 = _page_rows(table_ptr, ranks_ptr, 1, slot_c, offs_n, num_slots, max_pages, in_features, PAGE)
    if N_SLICES > 2:
        rank2, rows2 = _page_rows(table_ptr, ranks_ptr, 2, slot_c, offs_n, num_slots, max_pages, in_features, PAGE)
    top = rank0
    if N_SLICES > 1:
        top = tl.maximum(top, rank1)
    if N_SLICES > 2:
        top = tl.maximum(top, rank2)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, in_features)
    # base tiles and rank tiles past every slice's rank: no K loop, the stores write zeros
    k_hi = tl.where((slot >= 0) & (pid_n * BLOCK_N < top), k_hi, k_lo)

    acc0 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # [BM, BN] per slice
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)  # [BK]
        k_mask = offs_k < k_hi
        xt = tl.load(
            x_ptr + rows[:, None] * stride_xt + offs_k[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )  # [BM, BK], loaded once for all slices
        if DOT_FP32:
            xt = xt.to(tl.float32)
        acc0 = _slice_dot(acc0, xt, a0_ptr, rows0, rank0, offs_n, offs_k, k_mask, DOT_FP32)
        if N_SLICES > 1:
            acc1 = _slice_dot(acc1, xt, a1_ptr, rows1, rank1, offs_n, offs_k, k_mask, DOT_FP32)
        if N_SLICES > 2:
            acc2 = _slice_dot(acc2, xt, a2_ptr, rows2, rank2, offs_n, offs_k, k_mask, DOT_FP32)

    max_rank = max_pages * PAGE  # R, the width of t
    if HAS_RANK_SCALE:  # VeRA's λ_d per rank row, applied to each slice's t (1 for other adapters)
        rs = rank_scale_ptr + slot_c * max_rank + offs_n  # [BN], slice 0
        acc0 *= tl.load(rs, mask=offs_n < max_rank, other=1.0)[None, :]
        if N_SLICES > 1:
            acc1 *= tl.load(rs + num_slots * max_rank, mask=offs_n < max_rank, other=1.0)[None, :]
        if N_SLICES > 2:
            acc2 *= tl.load(rs + 2 * num_slots * max_rank, mask=offs_n < max_rank, other=1.0)[None, :]
    slice_stride = num_tokens * max_rank
    out_ptrs = out_ptr + split.to(tl.int64) * N_SLICES * slice_stride + rows[:, None] * max_rank + offs_n[None, :]
    mask = m_mask[:, None] & (offs_n < max_rank)[None, :]
    tl.store(out_ptrs, acc0, mask=mask)
    if N_SLICES > 1:
        tl.store(out_ptrs + slice_stride, acc1, mask=mask)
    if N_SLICES > 2:
        tl.store(out_ptrs + 2 * slice_stride, acc2, mask=mask)


def _blocks(block_m: int, max_rank: int, n_slices: int, elt: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps). Chosen by reasoning and checked by an offline sm_90
    compile (tests/kernels/test_compile_sm90.py, Triton 3.9, bf16, Llama-3-8B shapes): no
    spills; decode 16x16x256 takes 54 / 84 / 118 registers for 1 / 2 / 3 slices, prefill
    64xRx64 40-104. Not yet timed on a GPU (bench/lora_kernels.py reports the numbers to
    tune them by)."""
    if block_m <= 16:
        # Decode: x is a few rows, A is the whole transfer. Rank tiles of 16 (the
        # smallest N of a tensor-core dot) let a rank-8 adapter beside a rank-64 one
        # skip the tiles past its rank; re-reading x per rank tile costs next to nothing.
        block_n = 16
        k_cap = 256
    else:
        # Prefill: x is the whole transfer. One rank tile up to R = 64 reads x once;
        # n_slices accumulators of 64 × BN fp32 stay within 8 warps' registers.
        block_n = min(triton.next_power_of_2(max(max_rank, 16)), 128 if n_slices == 1 else 64)
        k_cap = 64
    block_k = triton.next_power_of_2(A_STAGE_BYTES // (block_n * n_slices * elt) + 1) // 2  # floor to a power of 2
    block_k = max(32, min(k_cap, block_k))
    num_warps = 8 if block_m * block_n * n_slices >= 8192 else 4
    return block_n, block_k, num_warps


def _split_k(programs: int, in_features: int, block_k: int, device: torch.device) -> int:
    """K splits so that a small decode batch still spreads A's bytes over the whole GPU:
    double until there are 2 programs per SM, keeping >= 4 K iterations per split."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    split = 1
    while split < 8 and programs * split < 2 * sms and in_features >= 8 * block_k * split:
        split *= 2
    return split


def shrink(
    x: torch.Tensor,  # [T, in]
    a_pages: Sequence[torch.Tensor],  # n_slices × [P_i, 16, in] rank pages of A
    page_table: torch.Tensor,  # [n_slices, S, MP] int32
    ranks: torch.Tensor,  # [n_slices, S] int32
    mapping: LoraMapping,
    *,
    rank_scale: torch.Tensor | None = None,  # [n_slices, S, MP * 16] float32, d per rank row (None = 1)
    out: torch.Tensor | None = None,  # [n_slices, T, MP * 16] float32, written (allocated if None)
    split_k: int | None = None,  # K splits (None: chosen from the shapes); reduced deterministically
) -> torch.Tensor:  # [n_slices, T, MP * 16] float32
    """Triton `shrink_ref`: same Semantics, every element of the output written."""
    n_slices = len(a_pages)
    if n_slices == 0:
        raise ValueError("shrink needs at least one slice")
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be [T, in] with unit column stride, got {tuple(x.shape)} strides {x.stride()}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"x dtype {x.dtype} not supported (fp32, bf16, fp16)")
    num_tokens, in_features = x.shape
    for a in a_pages:
        if a.dim() != 3 or a.shape[1:] != (RANK_PAGE, in_features) or a.dtype != x.dtype or a.device != x.device:
            raise ValueError(f"A pages must be [P, {RANK_PAGE}, {in_features}] of x's dtype and device, got {tuple(a.shape)} {a.dtype}")
        if not a.is_contiguous():
            raise ValueError("A pages must be contiguous")
    num_slots, max_pages = check_table(page_table, ranks, n_slices)
    max_rank = max_pages * RANK_PAGE  # R, the width of t
    if mapping.num_slots != num_slots or mapping.num_tokens != num_tokens:
        raise ValueError(f"mapping is for {mapping.num_tokens} tokens / {mapping.num_slots} slots")
    _check_rank_scale(rank_scale, n_slices, num_slots, max_rank)
    if out is None:
        out = torch.empty(n_slices, num_tokens, max_rank, dtype=torch.float32, device=x.device)
    elif out.shape != (n_slices, num_tokens, max_rank) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be contiguous float32 [{n_slices}, {num_tokens}, {max_rank}]")
    if not mapping.any_adapter or num_tokens == 0:
        return out.zero_()

    block_m, tile_slots, tile_starts, tile_ends = mapping.tiles()
    num_tiles = tile_slots.shape[0]  # G, a host bound (never read from the device)
    for i0 in range(0, n_slices, MAX_SLICES_PER_LAUNCH):
        chunk = list(a_pages[i0 : i0 + MAX_SLICES_PER_LAUNCH])
        nc = len(chunk)
        block_n, block_k, num_warps = _blocks(block_m, max_rank, nc, x.element_size())
        n_rank_tiles = triton.cdiv(max_rank, block_n)
        sk = split_k or _split_k(num_tiles * n_rank_tiles, in_features, block_k, x.device)
        k_per_split = triton.cdiv(triton.cdiv(in_features, sk), block_k) * block_k
        dst = out[i0 : i0 + nc]  # [nc, T, R]
        if sk > 1:  # partial sums, reduced below in a fixed order (no float atomics)
            dst = torch.empty(sk, nc, num_tokens, max_rank, dtype=torch.float32, device=x.device)
        chunk += [chunk[0]] * (MAX_SLICES_PER_LAUNCH - nc)
        grid = (num_tiles, n_rank_tiles, sk)
        _shrink_kernel[grid](
            x, *chunk, dst, page_table[i0 : i0 + nc], ranks[i0 : i0 + nc],
            rank_scale[i0 : i0 + nc] if rank_scale is not None else ranks,
            mapping.sorted_tokens, tile_slots, tile_starts, tile_ends,
            num_tokens, in_features, max_pages, num_slots,
            x.stride(0), k_per_split,
            N_SLICES=nc,
            PAGE=RANK_PAGE,
            HAS_RANK_SCALE=rank_scale is not None,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            # 16-bit inputs take the native tensor-core dot (exact products, fp32 sums);
            # Triton's CPU interpreter multiplies bf16 bit patterns (triton-lang/triton#11584)
            DOT_FP32=x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and x.device.type != "cuda"),
            num_warps=num_warps,
        )  # fmt: skip
        if sk > 1:
            torch.sum(dst, dim=0, out=out[i0 : i0 + nc])
    return out


def shrink_ref(
    x: torch.Tensor,  # [T, in]
    a_pages: Sequence[torch.Tensor],  # n_slices × [P_i, 16, in] rank pages of A
    page_table: torch.Tensor,  # [n_slices, S, MP] int32
    ranks: torch.Tensor,  # [n_slices, S] int32
    mapping: LoraMapping,
    *,
    rank_scale: torch.Tensor | None = None,  # [n_slices, S, MP * 16] float32, d per rank row (None = 1)
    out: torch.Tensor | None = None,  # [n_slices, T, MP * 16] float32, written (allocated if None)
) -> torch.Tensor:  # [n_slices, T, MP * 16] float32
    """Semantics:

        for i, pages in enumerate(a_pages):
            for tok in range(T):
                s = mapping.token_slots[tok]; r = ranks[i, s]
                A = rows 0..r-1 of pages[page_table[i, s, :ceil(r / 16)]]   # [r, in]
                t[i, tok, :r] = x[tok].float() @ A.float().T if s >= 0 else 0
                t[i, tok, :r] *= rank_scale[i, s, :r] if rank_scale is not None
                t[i, tok, r:] = 0

    Accumulates in fp32 and returns fp32 (never fp16). Page rows past the rank are not read.
    """
    num_tokens = x.shape[0]
    max_rank = page_table.shape[2] * RANK_PAGE
    if out is None:
        out = torch.zeros(len(a_pages), num_tokens, max_rank, dtype=torch.float32, device=x.device)
    else:
        out.zero_()
    if not mapping.any_adapter or num_tokens == 0:
        return out
    # The CPU backend: one padded bmm per slice for the short segments (decode rows over
    # any number of adapters), one matmul per longer segment (mapping.SlotGroups).
    groups = mapping.slot_groups()
    if groups.slots.numel():
        xs = x[groups.tokens].float()  # [D, M, in]
        tables = page_table[:, groups.slots]  # [n, D, MP]
        slot_ranks = ranks[:, groups.slots].clamp(max=max_rank)  # [n, D]
        for i, (pages, bound) in enumerate(zip(a_pages, slot_ranks.amax(1).tolist())):
            n = pages_for(bound)
            if n == 0:
                continue  # no slot of the batch targets this slice
            r_pad = n * RANK_PAGE
            for part, rows in groups.runs(r_pad * x.shape[1]):
                # column j of t reads only rank row j of A: the rows past each rank are masked
                # in t [C, M, R], not in the larger A [C, R, in] (they may hold anything)
                a = gather_rows(pages, tables[i][part], slot_ranks[i][part], n, zero_past_rank=False)  # [C, R_i, in]
                t = torch.bmm(xs[part], a.float().transpose(1, 2))  # [C, M, R_i]
                if rank_scale is not None:
                    t = t * rank_scale[i, groups.slots[part], :r_pad][:, None, :]
                t = torch.where(live_rows(slot_ranks[i][part], r_pad)[:, None, :], t, 0.0)
                out[i, rows, :r_pad] = t[groups.valid[part]]
    if groups.long:
        table, rank_of = page_table.tolist(), ranks.tolist()  # n_slices × [S × [MP]], n_slices × [S]
    for s, rows in groups.long:
        xs = x[rows].float()  # [T_s, in]
        for i, pages in enumerate(a_pages):
            r = min(rank_of[i][s], max_rank)
            if r > 0:
                t = xs @ rows_of(pages, table[i][s], r).float().T  # [T_s, r]
                out[i, rows, :r] = t if rank_scale is None else t * rank_scale[i, s, :r]
    return out


def _check_rank_scale(rank_scale: torch.Tensor | None, n_slices: int, num_slots: int, max_rank: int) -> None:
    if rank_scale is None:
        return
    if rank_scale.shape != (n_slices, num_slots, max_rank) or rank_scale.dtype != torch.float32 or not rank_scale.is_contiguous():
        raise ValueError(f"rank_scale must be contiguous float32 [{n_slices}, {num_slots}, {max_rank}]")
