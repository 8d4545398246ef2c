"""rope_kv_write: rotary position embedding of q and k fused with the KV-cache write, from
the fused q|k|v projection output, in one pass.

`rope_kv_write_ref` is the Semantics and the CPU backend: exactly DecoderLayer's
`q * cos + rotate_half(q) * sin` (and the same for k) and `KVCache.write`'s index_copy_,
op for op. `rope_kv_write` is the Triton kernel's launcher, drop-in on CUDA.

cos/sin: `rope_cache` builds, once at model load, a table cos_sin [max_positions, 2, D]
in the model dtype (cos_sin[p, 0] = cos row, cos_sin[p, 1] = sin row of position p),
computed exactly as LlamaModel.forward computes cos and sin for a step's positions, so a
row gathered from it is bit-identical to today's per-step row.

In-place contract:
  - qkv [T, (H + 2 KVH) D] (columns q heads | k heads | v heads): its q columns are
    overwritten with rotated q; the returned q is the [T, H, D] view of them. The k and
    v columns are left as they were.
  - k_cache, v_cache [num_blocks * block_size, KVH, D]: rotated k and v of token t are
    written to row slot_mapping[t]; rows with slot_mapping[t] < 0 (padding) are written
    nowhere, and no other cache row is touched. Non-negative slots must be distinct.
  - positions [T] must lie in [0, max_positions) and slots below the cache's row count:
    the kernel does not check them (that would read a device tensor back).

Kernel layout: one program per (token, block of HEADS heads), the q-head blocks first,
then the kv-head blocks (each rotates k and copies v of its heads); grid
(T, cdiv(H, HEADS) + cdiv(KVH, HEADS)) from the shapes only, and the launcher never
reads a device tensor back, so a launch is CUDA-graph capturable. Math in fp32, rounded
to the dtype where the ref rounds (each product, then the sum): for bf16/fp16 the
products are exact in fp32, so the kernel should be bitwise equal to the ref; for fp32
the GPU compiler may contract a product and the sum into an FMA (an fp32 ulp). In
Triton's interpreter the bf16 roundings are done on the bits (`kernels/rounding.py`), as the
interpreter truncates; there all three dtypes match the ref bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraplex.kernels.rounding import round_to

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)
# Heads per program: 8 heads x D 128 = 1024 elements of q (or of k and of v) per program,
# 4 warps. Chosen by reasoning, not yet measured (bench/elementwise.py reports it).
HEADS = 8


def rope_cache(
    inv_freq: torch.Tensor,  # [D / 2] float32
    attention_scaling: float,
    max_positions: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:  # [max_positions, 2, D] dtype: [p, 0] = cos, [p, 1] = sin
    """LlamaModel.forward's cos/sin for positions arange(max_positions), op for op:

        freqs = positions.float().unsqueeze(1) * inv_freq.unsqueeze(0)   # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)                          # [P, D]
        cos = (emb.cos() * attention_scaling).to(dtype); sin likewise
    """
    inv_freq = inv_freq.to(device)
    positions = torch.arange(max_positions, device=device)
    freqs = positions.float().unsqueeze(1) * inv_freq.unsqueeze(0)  # [P, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
    cos = (emb.cos() * attention_scaling).to(dtype)
    sin = (emb.sin() * attention_scaling).to(dtype)
    return torch.stack((cos, sin), dim=1)  # [P, 2, D]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """server/model/llama.py's rotate_half, op for op: [..., D] -> cat(-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@triton.jit
def _rotate(x_lo, x_hi, c_lo, c_hi, s_lo, s_hi, EMULATE: tl.constexpr):
    """x * cos + rotate_half(x) * sin on [HEADS, HALF] halves, rounded where torch rounds:
    each product, then the sum."""
    a, b = x_lo.to(tl.float32), x_hi.to(tl.float32)
    lo = round_to(a * c_lo, x_lo.dtype, EMULATE).to(tl.float32) + round_to(-b * s_lo, x_lo.dtype, EMULATE).to(tl.float32)
    hi = round_to(b * c_hi, x_lo.dtype, EMULATE).to(tl.float32) + round_to(a * s_hi, x_lo.dtype, EMULATE).to(tl.float32)
    return round_to(lo, x_lo.dtype, EMULATE), round_to(hi, x_lo.dtype, EMULATE)


@triton.jit
def _rope_kv_kernel(
    qkv_ptr,  # [T, (H + 2 KVH) D], row stride stride_qkv, unit column stride; q columns rotated in place
    cs_ptr,  # [P, 2, D] contiguous
    pos_ptr,  # [T] int32/int64
    k_cache_ptr,  # [N, KVH, D] contiguous
    v_cache_ptr,  # [N, KVH, D] contiguous
    slot_ptr,  # [T] int32/int64, < 0: not written
    stride_qkv,
    num_heads,  # H
    num_kv_heads,  # KVH
    HEAD_DIM: tl.constexpr,  # D
    HALF_BLOCK: tl.constexpr,  # next power of 2 >= D / 2
    HEADS: tl.constexpr,  # heads per program
    EMULATE: tl.constexpr,  # round to bf16 on the bits (the interpreter)
):
    tok = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    HALF: tl.constexpr = HEAD_DIM // 2
    n_q_blocks = tl.cdiv(num_heads, HEADS)
    offs_d = tl.arange(0, HALF_BLOCK)  # [HB] columns of the first half
    d_mask = offs_d < HALF
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    cs = cs_ptr + pos * (2 * HEAD_DIM)
    c_lo = tl.load(cs + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]  # [1, HB]
    c_hi = tl.load(cs + HALF + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s_lo = tl.load(cs + HEAD_DIM + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s_hi = tl.load(cs + HEAD_DIM + HALF + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    row = qkv_ptr + tok * stride_qkv
    if blk < n_q_blocks:  # q heads: rotated in place
        heads = blk * HEADS + tl.arange(0, HEADS)  # [HEADS]
        mask = (heads < num_heads)[:, None] & d_mask[None, :]
        ptrs = row + heads[:, None] * HEAD_DIM + offs_d[None, :]  # [HEADS, HB], first halves
        lo, hi = _rotate(tl.load(ptrs, mask=mask), tl.load(ptrs + HALF, mask=mask), c_lo, c_hi, s_lo, s_hi, EMULATE)
        tl.store(ptrs, lo, mask=mask)
        tl.store(ptrs + HALF, hi, mask=mask)
    else:  # kv heads: k rotated and v copied into the cache at the token's slot
        slot = tl.load(slot_ptr + tok).to(tl.int64)
        heads = (blk - n_q_blocks) * HEADS + tl.arange(0, HEADS)  # [HEADS]
        mask = (heads < num_kv_heads)[:, None] & d_mask[None, :]
        k_ptrs = row + (num_heads + heads[:, None]) * HEAD_DIM + offs_d[None, :]  # [HEADS, HB]
        v_ptrs = k_ptrs + num_kv_heads * HEAD_DIM
        k_lo, k_hi = _rotate(tl.load(k_ptrs, mask=mask), tl.load(k_ptrs + HALF, mask=mask), c_lo, c_hi, s_lo, s_hi, EMULATE)
        v_lo = tl.load(v_ptrs, mask=mask)
        v_hi = tl.load(v_ptrs + HALF, mask=mask)
        dst = slot * (num_kv_heads * HEAD_DIM) + heads[:, None] * HEAD_DIM + offs_d[None, :]  # [HEADS, HB]
        mask = (heads < tl.where(slot >= 0, num_kv_heads, 0))[:, None] & d_mask[None, :]  # padding rows: no write
        tl.store(k_cache_ptr + dst, k_lo, mask=mask)
        tl.store(k_cache_ptr + dst + HALF, k_hi, mask=mask)
        tl.store(v_cache_ptr + dst, v_lo, mask=mask)
        tl.store(v_cache_ptr + dst + HALF, v_hi, mask=mask)


def _check(qkv, cos_sin, positions, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, head_dim) -> None:
    width = (num_heads + 2 * num_kv_heads) * head_dim
    if num_heads < 1 or num_kv_heads < 1 or head_dim < 2 or head_dim % 2:
        raise ValueError(f"bad heads {num_heads}/{num_kv_heads} or head_dim {head_dim} (must be even)")
    if qkv.dim() != 2 or qkv.shape[1] != width or qkv.stride(1) != 1:
        raise ValueError(f"qkv must be [T, {width}] with unit column stride, got {tuple(qkv.shape)} strides {qkv.stride()}")
    if qkv.dtype not in DTYPES:
        raise TypeError(f"qkv dtype {qkv.dtype} not supported (fp32, bf16, fp16)")
    num_tokens = qkv.shape[0]
    if cos_sin.dim() != 3 or cos_sin.shape[1:] != (2, head_dim) or cos_sin.dtype != qkv.dtype or not cos_sin.is_contiguous():
        raise ValueError(f"cos_sin must be contiguous [P, 2, {head_dim}] {qkv.dtype}, got {tuple(cos_sin.shape)} {cos_sin.dtype}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 3 or c.shape[1:] != (num_kv_heads, head_dim) or c.dtype != qkv.dtype or not c.is_contiguous():
            raise ValueError(f"{name} must be contiguous [N, {num_kv_heads}, {head_dim}] {qkv.dtype}, got {tuple(c.shape)} {c.dtype}")
    if k_cache.shape != v_cache.shape:
        raise ValueError("k_cache and v_cache differ in shape")
    for name, idx in (("positions", positions), ("slot_mapping", slot_mapping)):
        if idx.shape != (num_tokens,) or idx.dtype not in INDEX_DTYPES or not idx.is_contiguous():
            raise ValueError(f"{name} must be contiguous [{num_tokens}] int32/int64, got {tuple(idx.shape)} {idx.dtype}")
    for t in (cos_sin, positions, k_cache, v_cache, slot_mapping):
        if t.device != qkv.device:
            raise ValueError(f"all tensors must be on {qkv.device}")


def rope_kv_write(
    qkv: torch.Tensor,  # [T, (H + 2 KVH) D], unit column stride: q columns rotated in place
    cos_sin: torch.Tensor,  # [P, 2, D] contiguous, qkv.dtype (rope_cache)
    positions: torch.Tensor,  # [T] int32/int64, each in [0, P)
    k_cache: torch.Tensor,  # [N, KVH, D] contiguous, qkv.dtype: rows slot_mapping written
    v_cache: torch.Tensor,  # [N, KVH, D] contiguous, qkv.dtype: rows slot_mapping written
    slot_mapping: torch.Tensor,  # [T] int32/int64, < 0: not written (padding)
    num_heads: int,  # H
    num_kv_heads: int,  # KVH
    head_dim: int,  # D
) -> torch.Tensor:  # q [T, H, D], a view of qkv
    """Triton `rope_kv_write_ref`: same Semantics and in-place contract."""
    _check(qkv, cos_sin, positions, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, head_dim)
    num_tokens = qkv.shape[0]
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)  # [T, H, D]
    if num_tokens == 0:
        return q
    grid = (num_tokens, triton.cdiv(num_heads, HEADS) + triton.cdiv(num_kv_heads, HEADS))
    _rope_kv_kernel[grid](
        qkv, cos_sin, positions, k_cache, v_cache, slot_mapping,
        qkv.stride(0), num_heads, num_kv_heads,
        HEAD_DIM=head_dim,
        HALF_BLOCK=triton.next_power_of_2(head_dim // 2),
        HEADS=HEADS,
        EMULATE=qkv.device.type != "cuda",
        num_warps=4,
    )  # fmt: skip
    return q


def rope_kv_write_ref(
    qkv: torch.Tensor,  # [T, (H + 2 KVH) D]: q columns rotated in place
    cos_sin: torch.Tensor,  # [P, 2, D] (rope_cache)
    positions: torch.Tensor,  # [T] int32/int64
    k_cache: torch.Tensor,  # [N, KVH, D]: rows slot_mapping written
    v_cache: torch.Tensor,  # [N, KVH, D]: rows slot_mapping written
    slot_mapping: torch.Tensor,  # [T] int32/int64, < 0: not written (padding)
    num_heads: int,  # H
    num_kv_heads: int,  # KVH
    head_dim: int,  # D
) -> torch.Tensor:  # q [T, H, D], a view of qkv
    """Semantics (DecoderLayer.forward and KVCache.write, op for op):

        q, k, v = qkv.split([H * D, KVH * D, KVH * D], dim=-1)
        q = q.reshape(-1, H, D); k = k.reshape(-1, KVH, D); v = v.reshape(-1, KVH, D)
        cos = cos_sin[positions, 0].unsqueeze(1); sin = cos_sin[positions, 1].unsqueeze(1)  # [T, 1, D]
        q[:] = q * cos + rotate_half(q) * sin                  # in place in qkv
        k = k * cos + rotate_half(k) * sin
        keep = slot_mapping >= 0                               # padding rows are not written
        k_cache.index_copy_(0, slot_mapping[keep], k[keep])
        v_cache.index_copy_(0, slot_mapping[keep], v.contiguous()[keep])
        return q

    The boolean mask reads the device back: this is the CPU backend, not for CUDA graphs.
    """
    q_width, kv_width = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split([q_width, kv_width, kv_width], dim=-1)
    q = q.reshape(-1, num_heads, head_dim)  # [T, H, D], a view of qkv
    k = k.reshape(-1, num_kv_heads, head_dim)  # [T, KVH, D]
    v = v.reshape(-1, num_kv_heads, head_dim)
    cos = cos_sin[positions, 0].unsqueeze(1)  # [T, 1, D]
    sin = cos_sin[positions, 1].unsqueeze(1)
    q.copy_(q * cos + rotate_half(q) * sin)
    k = k * cos + rotate_half(k) * sin
    keep = slot_mapping >= 0  # [T]
    slots = slot_mapping[keep].long()
    k_cache.index_copy_(0, slots, k[keep])
    v_cache.index_copy_(0, slots, v.contiguous()[keep])
    return q
