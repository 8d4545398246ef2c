"""expand: the second half of the adapter delta, written in place over several output
slices (q|k|v, gate|up) in one call, with DoRA's magnitude scale in the epilogue and
every adapter's B read from rank pages (kernels/rank_pages.py).

`expand_ref` is the Semantics and the CPU backend; the Triton kernel and its launcher
(`expand`) are drop-in on CUDA.

Kernel layout: one program per (tile of <= BLOCK_M tokens of one slot, from the
mapping's tile list) × (tile of BLOCK_N output columns). The column tiles of all slices
are numbered one after another (slice i owns ceil(out_i / BLOCK_N) of them), so slices
of unequal widths (4096 | 1024 | 1024) share one launch and no tile straddles two slices.
The K loop runs over the slot's own pages (its rank rounded up to 16), one page of Bᵀ,
a contiguous [16, out_i] block, per step, so adapters of rank 8 and 128 share a launch
without the small ones paying for the large. The grid depends only
on host integers (see kernels/mapping.py), so a captured launch replays with any mapping
of the same token count. Base-only tiles exit at once: their rows are never touched.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from loraplex.kernels.mapping import LoraMapping
from loraplex.kernels.rank_pages import RANK_PAGE, check_table, gather_rows, live_rows, pages_for, rows_of

MAX_SLICES_PER_LAUNCH = 3  # q|k|v, the widest fused module of the Llama family; more slices take more launches
# Output columns per program. 128 bf16 columns of y are 256 B per row (full cache lines);
# the decode qkv case (6144 columns, 64 one-token tiles) still gets 3072 programs.
# Chosen by reasoning, not yet timed on a GPU (bench/lora_kernels.py); an offline sm_90
# compile (tests/kernels/test_compile_sm90.py, Triton 3.9) shows no spills: 51-76
# registers at BLOCK_M 16, 126-148 at 64 (4 warps), 5-20 KiB of shared memory.
BLOCK_N = 128
# Rank step: one rank page (16 rows, the K of one bf16 tensor-core dot).
BLOCK_K = RANK_PAGE


@triton.jit
def _expand_kernel(
    y_ptr,  # [T, sum(out_i)] (columns of this launch's first slice start here), unit column stride
    t_ptr,  # [N_SLICES, T, R] float32 or bf16, contiguous; R = MP * 16
    b0_ptr,  # [P, 16, out_0] contiguous rank pages of Bᵀ
    b1_ptr,  # [P, 16, out_1] (aliases b0 when N_SLICES < 2)
    b2_ptr,  # [P, 16, out_2] (aliases b0 when N_SLICES < 3)
    g0_ptr,  # [S, out_0] DoRA magnitude scale (unused unless HAS_G)
    g1_ptr,  # [S, out_1]
    g2_ptr,  # [S, out_2]
    o0_ptr,  # [S, out_0] VeRA's λ_b, scales the delta (unused unless HAS_O)
    o1_ptr,  # [S, out_1]
    o2_ptr,  # [S, out_2]
    scales_ptr,  # [N_SLICES, S] float32, contiguous
    table_ptr,  # [N_SLICES, S, MP] int32 page ids
    ranks_ptr,  # [N_SLICES, S] int32
    sorted_tokens_ptr,  # [T] int32
    tile_slots_ptr,  # [G] int32, slot, -1 base tile, -2 empty
    tile_starts_ptr,  # [G] int32
    tile_ends_ptr,  # [G] int32
    num_tokens,  # T
    max_pages,  # MP
    num_slots,  # S
    stride_yt,
    w0,  # out_0
    w1,  # out_1 (0 when N_SLICES < 2)
    w2,  # out_2 (0 when N_SLICES < 3)
    N_SLICES: tl.constexpr,
    HAS_G: tl.constexpr,
    HAS_O: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)  # column tile, numbered across slices
    slot = tl.load(tile_slots_ptr + tile)
    if slot < 0:  # base-only rows stay untouched; past the last tile: nothing to do
        return
    slot_c = slot.to(tl.int64)

    # which slice this column tile belongs to
    nt0 = tl.cdiv(w0, BLOCK_N)
    nt1 = tl.cdiv(w1, BLOCK_N)
    in1 = (pid_n >= nt0).to(tl.int32)
    in2 = (pid_n >= nt0 + nt1).to(tl.int32)
    sl = in1 + in2
    local_n = pid_n - in1 * nt0 - in2 * nt1
    col0 = in1 * w0 + in2 * w1  # first column of the slice in y
    width = w0 + in1 * (w1 - w0) + in2 * (w2 - w1)
    b_ptr = b0_ptr
    g_ptr = g0_ptr
    o_ptr = o0_ptr
    if N_SLICES > 1:
        if sl == 1:
            b_ptr = b1_ptr
            g_ptr = g1_ptr
            o_ptr = o1_ptr
    if N_SLICES > 2:
        if sl == 2:
            b_ptr = b2_ptr
            g_ptr = g2_ptr
            o_ptr = o2_ptr

    max_rank = max_pages * BLOCK_K  # R, the width of t
    rank = tl.minimum(tl.load(ranks_ptr + sl * num_slots + slot_c), max_rank)
    k_stop = tl.cdiv(rank, BLOCK_K) * BLOCK_K  # the slot's rank rounded up to 16
    scale = tl.load(scales_ptr + sl * num_slots + slot_c)

    start = tl.load(tile_starts_ptr + tile)
    end = tl.load(tile_ends_ptr + tile)
    offs_m = start + tl.arange(0, BLOCK_M)  # [BM] positions in sorted_tokens
    m_mask = offs_m < end
    rows = tl.load(sorted_tokens_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)  # [BM] token ids
    offs_n = local_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] columns within the slice
    n_mask = offs_n < width

    t_base = t_ptr + sl.to(tl.int64) * num_tokens * max_rank  # t[slice], [T, R]
    pages = table_ptr + (sl * num_slots + slot_c) * max_pages  # this slot's page ids
    offs_p = tl.arange(0, BLOCK_K)  # [BK] rows within a page
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # [BM, BN]
    for k in range(0, k_stop, BLOCK_K):
        page = tl.load(pages + k // BLOCK_K).to(tl.int64)
        offs_k = k + offs_p  # [BK]
        k_mask = offs_k < rank
        tt = tl.load(
            t_base + rows[:, None] * max_rank + offs_k[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        ).to(tl.float32)  # [BM, BK]
        bt = tl.load(
            b_ptr + page * BLOCK_K * width + offs_p[:, None] * width + offs_n[None, :],
            mask=n_mask[None, :] & k_mask[:, None],
            other=0.0,
        ).to(tl.float32)  # [BK, BN] = Bᵀ[rank rows k.., columns n]
        acc += tl.dot(tt, bt, input_precision=PRECISION)

    mask = m_mask[:, None] & n_mask[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_yt + (col0 + offs_n)[None, :]  # [BM, BN]
    if HAS_O:
        acc *= tl.load(o_ptr + slot_c * width + offs_n, mask=n_mask, other=1.0).to(tl.float32)[None, :]
    v = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32) + scale * acc
    if HAS_G:
        gv = tl.load(g_ptr + slot_c * width + offs_n, mask=n_mask, other=1.0).to(tl.float32)  # [BN]
        v = v * gv[None, :]
    tl.store(y_ptrs, v.to(y_ptr.dtype.element_ty), mask=mask)


def expand(
    y: torch.Tensor,  # [T, sum(out_i)], updated in place
    t: torch.Tensor,  # [n_slices, T, MP * 16] float32 (or bf16), from shrink
    bt_pages: Sequence[torch.Tensor],  # n_slices × [P_i, 16, out_i] rank pages of Bᵀ
    page_table: torch.Tensor,  # [n_slices, S, MP] int32
    ranks: torch.Tensor,  # [n_slices, S] int32
    scales: torch.Tensor,  # [n_slices, S] float32
    g: Sequence[torch.Tensor] | None,  # n_slices × [S, out_i] (ones for non-DoRA slots), or None
    mapping: LoraMapping,
    *,
    out_scale: Sequence[torch.Tensor] | None = None,  # n_slices × [S, out_i], o (ones for non-VeRA slots), or None
) -> None:
    """Triton `expand_ref`: same Semantics, all slices in one launch (up to 3)."""
    n_slices = len(bt_pages)
    if n_slices == 0:
        raise ValueError("expand needs at least one slice")
    if y.dim() != 2 or y.stride(1) != 1:
        raise ValueError(f"y must be [T, out] with unit column stride, got {tuple(y.shape)} strides {y.stride()}")
    if y.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"y dtype {y.dtype} not supported (fp32, bf16, fp16)")
    num_tokens = y.shape[0]
    widths = [b.shape[-1] for b in bt_pages]
    for b in bt_pages:
        if b.dim() != 3 or b.shape[1] != RANK_PAGE or not b.is_contiguous():
            raise ValueError(f"Bᵀ pages must be contiguous [P, {RANK_PAGE}, out_i], got {tuple(b.shape)}")
        if b.dtype != y.dtype or b.device != y.device:
            raise ValueError(f"Bᵀ pages must have y's dtype and device, got {b.dtype} on {b.device}")
    if sum(widths) != y.shape[1]:
        raise ValueError(f"output slices cover {sum(widths)} columns but y has {y.shape[1]}")
    num_slots, max_pages = check_table(page_table, ranks, n_slices)
    max_rank = max_pages * RANK_PAGE
    if t.shape != (n_slices, num_tokens, max_rank) or t.dtype not in (torch.float32, torch.bfloat16):
        want = f"[{n_slices}, {num_tokens}, {max_rank}]"
        raise ValueError(f"t must be float32/bf16 {want}, got {tuple(t.shape)} {t.dtype}")
    if not t.is_contiguous():
        raise ValueError("t must be contiguous")
    if scales.shape != (n_slices, num_slots) or scales.dtype != torch.float32 or not scales.is_contiguous():
        raise ValueError(f"scales must be contiguous float32 [{n_slices}, {num_slots}]")
    for name, vecs in (("g", g), ("out_scale", out_scale)):
        if vecs is None:
            continue
        if len(vecs) != n_slices:
            raise ValueError(f"{name} has {len(vecs)} slices, B has {n_slices}")
        for v, w in zip(vecs, widths):
            if v.shape != (num_slots, w) or not v.is_contiguous() or v.dtype != vecs[0].dtype:
                raise ValueError(f"{name} slices must be contiguous [S, out_i] of one dtype, got {tuple(v.shape)}")
    if mapping.num_slots != num_slots or mapping.num_tokens != num_tokens:
        raise ValueError(f"mapping is for {mapping.num_tokens} tokens / {mapping.num_slots} slots")
    if not mapping.any_adapter or num_tokens == 0:
        return

    block_m, tile_slots, tile_starts, tile_ends = mapping.tiles()
    num_tiles = tile_slots.shape[0]  # G, a host bound (never read from the device)
    col = 0
    for i0 in range(0, n_slices, MAX_SLICES_PER_LAUNCH):
        i1 = min(i0 + MAX_SLICES_PER_LAUNCH, n_slices)
        nc = i1 - i0
        pad = MAX_SLICES_PER_LAUNCH - nc
        bs = list(bt_pages[i0:i1]) + [bt_pages[i0]] * pad
        gs = (list(g[i0:i1]) + [g[i0]] * pad) if g is not None else [scales] * MAX_SLICES_PER_LAUNCH
        outs = (list(out_scale[i0:i1]) + [out_scale[i0]] * pad) if out_scale is not None else [scales] * MAX_SLICES_PER_LAUNCH
        ws = widths[i0:i1] + [0] * pad
        n_col_tiles = sum(triton.cdiv(w, BLOCK_N) for w in ws)
        grid = (num_tiles, n_col_tiles)
        _expand_kernel[grid](
            y[:, col:], t[i0:i1], *bs, *gs, *outs, scales[i0:i1], page_table[i0:i1], ranks[i0:i1],
            mapping.sorted_tokens, tile_slots, tile_starts, tile_ends,
            num_tokens, max_pages, num_slots, y.stride(0), *ws,
            N_SLICES=nc,
            HAS_G=g is not None,
            HAS_O=out_scale is not None,
            BLOCK_M=block_m,
            BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K,
            # 16-bit pages: B is exact in tf32 and t keeps fp32's range (never fp16);
            # its 11-bit mantissa is below the bf16/fp16 rounding of y.
            PRECISION="ieee" if y.dtype == torch.float32 else "tf32",
            num_warps=4,
        )  # fmt: skip
        col += sum(widths[i0:i1])


def expand_ref(
    y: torch.Tensor,  # [T, sum(out_i)], updated in place
    t: torch.Tensor,  # [n_slices, T, MP * 16] float32 (or bf16), from shrink
    bt_pages: Sequence[torch.Tensor],  # n_slices × [P_i, 16, out_i] rank pages of Bᵀ
    page_table: torch.Tensor,  # [n_slices, S, MP] int32
    ranks: torch.Tensor,  # [n_slices, S] int32
    scales: torch.Tensor,  # [n_slices, S] float32
    g: Sequence[torch.Tensor] | None,  # n_slices × [S, out_i] (ones for non-DoRA slots), or None
    mapping: LoraMapping,
    *,
    out_scale: Sequence[torch.Tensor] | None = None,  # n_slices × [S, out_i], o (ones for non-VeRA slots), or None
) -> None:
    """Semantics, for each slice i with output columns [o_i, o_i + out_i) of y:

        for tok in range(T):
            s = mapping.token_slots[tok]; r = ranks[i, s]
            if s < 0: continue                          # base-only rows are untouched
            Bt = rows 0..r-1 of bt_pages[i][page_table[i, s, :ceil(r / 16)]]   # [r, out_i]
            d = scales[i, s] * (t[i, tok, :r].float() @ Bt.float())
            if out_scale is not None: d = out_scale[i][s].float() * d
            v = y[tok, o_i:o_i+out_i].float() + d
            if g is not None: v = g[i][s].float() * v
            y[tok, o_i:o_i+out_i] = v.to(y.dtype)
    """
    if not mapping.any_adapter or y.shape[0] == 0:
        return
    widths = [b.shape[-1] for b in bt_pages]
    offsets = [sum(widths[:i]) for i in range(len(widths))]
    if sum(widths) != y.shape[1]:
        raise ValueError(f"output slices cover {sum(widths)} columns but y has {y.shape[1]}")
    max_rank = page_table.shape[2] * RANK_PAGE
    # The CPU backend: one padded bmm per slice for the short segments (decode rows over
    # any number of adapters), one matmul per longer segment (mapping.SlotGroups).
    groups = mapping.slot_groups()
    if groups.slots.numel():
        slots = groups.slots  # [D]
        tables = page_table[:, slots]  # [n, D, MP]
        slot_ranks = ranks[:, slots].clamp(max=max_rank)  # [n, D]
        slot_scales = scales[:, slots]  # [n, D]
        for i, (pages, bound) in enumerate(zip(bt_pages, slot_ranks.amax(1).tolist())):
            cols = slice(offsets[i], offsets[i] + widths[i])
            n = pages_for(bound)
            r_pad = n * RANK_PAGE
            for part, rows in groups.runs(max(r_pad, 1) * widths[i]):
                tokens, s = groups.tokens[part], slots[part]  # [C, M], [C]
                v = y[tokens, cols].float()  # [C, M, out_i]
                if n > 0:
                    ranks_c = slot_ranks[i][part]  # [C]
                    ts = torch.where(live_rows(ranks_c, r_pad)[:, None, :], t[i][tokens, :r_pad].float(), 0.0)  # [C, M, R_i]
                    d = torch.bmm(ts, gather_rows(pages, tables[i][part], ranks_c, n).float())  # [C, M, out_i]
                    if out_scale is not None:
                        d = out_scale[i][s].float()[:, None, :] * d
                    v += slot_scales[i][part][:, None, None] * d
                if g is not None:
                    v = g[i][s].float()[:, None, :] * v
                y[rows, cols] = v[groups.valid[part]].to(y.dtype)
    if groups.long:
        table, rank_of, scale_of = page_table.tolist(), ranks.tolist(), scales.tolist()
    for s, rows in groups.long:
        for i, pages in enumerate(bt_pages):
            r = min(rank_of[i][s], max_rank)
            cols = slice(offsets[i], offsets[i] + widths[i])
            v = y[rows, cols].float()  # [T_s, out_i]
            if r > 0:
                d = t[i, rows, :r].float() @ rows_of(pages, table[i][s], r).float()  # [T_s, out_i]
                if out_scale is not None:
                    d = out_scale[i][s].float() * d
                v += scale_of[i][s] * d
            if g is not None:
                v = g[i][s].float() * v
            y[rows, cols] = v.to(y.dtype)
