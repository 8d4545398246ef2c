"""nf4_matmul: y = x @ dequant(W)ᵀ for bitsandbytes NF4 weights, dequantized in registers.

Past one token, bitsandbytes' 4-bit matmul often writes the whole dequantized weight to
memory and then calls cuBLAS (0.50.2 picks that or its own fused kernel per shape by a
heuristic). This kernel reads the 4-bit weight once per output tile and never writes
the dequantized weight. `nf4_matmul_ref` is the Semantics (bitsandbytes
dequantization, then an fp32 matmul) and the tests' oracle; bitsandbytes stays the CPU
path and the fallback (`use_triton_nf4` says which one a shape gets).

Weights come from `bitsandbytes.functional.quantize_4bit(W, blocksize=64,
quant_type="nf4", compress_statistics=...)` (server/model/quantize.py) and are repacked
once at load by `PackedNF4.from_bnb`, which replaces bitsandbytes' storage byte for byte
(same tensors, permuted; `to_bnb` inverts it) and is exact: `dequantize_packed(p)` is
bit-identical to `bitsandbytes.functional.dequantize_4bit`, and the kernel multiplies
exactly those weights (rounded to the activation dtype, as `matmul_4bit` does).

Layout. bitsandbytes keeps the codes of the row-major [N, K] weight two per byte, the
even element in the high nibble. `PackedNF4.qweight` keeps the same [N, K/2] bytes, but
inside each 64-element quant block byte j holds element j (low nibble) and element
32 + j (high nibble): a byte tile [rows, 32] unpacks into two [rows, 32] halves that pair
with contiguous runs of x (no interleave), and the block's absmax broadcasts along one
axis. absmax is stored transposed, [K/64, N], so a tile's absmax is one contiguous load.
With double quantization absmax stays 8-bit (codes into bitsandbytes' 256-entry dynamic
table, one fp32 scale per 256 absmax, one offset) and is dequantized in the kernel, so
the weight moves 4.127 bits per element, as in bitsandbytes (fp32 absmax would be 4.5).

What it does not know: adapters, batching, which linears use it (the engine decides
once per shape at load with `use_triton_nf4`).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from loraplex.kernels.rounding import round_to

QBLOCK = 64  # NF4 quant block (elements of one weight row sharing an absmax); the only size supported


# --------------------------------------------------------------------------- storage


@dataclass(frozen=True)
class PackedNF4:
    """An NF4 weight [N, K] in the kernel's layout (module docstring). Build with `from_bnb`."""

    qweight: torch.Tensor  # [N, K/2] uint8: byte (n, kb*32+j) = code(n, kb*64+j) | code(n, kb*64+32+j) << 4
    absmax: torch.Tensor  # [K/64, N] uint8 codes into code2 (nested) or float32 (plain)
    absmax2: Optional[torch.Tensor]  # [ceil(N*K/64 / nested_blocksize)] float32, bitsandbytes' order (n*K/64 + kb)
    code2: Optional[torch.Tensor]  # [256] float32: bitsandbytes' 8-bit dynamic code for absmax
    offset: Optional[torch.Tensor]  # [1] float32: mean absmax, added back after the nested dequant
    code: torch.Tensor  # [16] float32: the NF4 table (quant_state.code)
    shape: tuple  # (N, K)
    dtype: torch.dtype  # quant_state.dtype: what bitsandbytes dequantizes to (kept for to_bnb)
    nested_blocksize: int = 256  # absmax values per absmax2 scale

    def __post_init__(self) -> None:
        n, k = self.shape
        if k % QBLOCK:
            raise ValueError(f"K={k} is not a multiple of the quant block {QBLOCK}")
        if self.qweight.shape != (n, k // 2) or self.qweight.dtype != torch.uint8:
            raise ValueError(f"qweight must be uint8 [{n}, {k // 2}], got {self.qweight.dtype} {list(self.qweight.shape)}")
        nested = self.absmax2 is not None
        want = torch.uint8 if nested else torch.float32
        if self.absmax.shape != (k // QBLOCK, n) or self.absmax.dtype != want:
            raise ValueError(f"absmax must be {want} [{k // QBLOCK}, {n}], got {self.absmax.dtype} {list(self.absmax.shape)}")
        if nested and (self.code2 is None or self.offset is None or self.code2.numel() != 256):
            raise ValueError("nested absmax needs code2 [256] and offset [1]")
        if self.nested_blocksize & (self.nested_blocksize - 1):
            raise ValueError(f"nested_blocksize must be a power of two, got {self.nested_blocksize}")
        if n * k // 2 >= 2**31:
            raise ValueError("weights of 2**32 or more elements are not supported (int32 offsets)")

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        parts = (self.qweight, self.absmax, self.absmax2, self.code2, self.offset, self.code)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    @classmethod
    def from_bnb(cls, packed_data: torch.Tensor, quant_state) -> "PackedNF4":
        """Repacks a Params4bit's uint8 `.data` ([N*K/2, 1]) and its QuantState. Exact."""
        if quant_state.quant_type != "nf4" or quant_state.blocksize != QBLOCK:
            raise ValueError(f"need NF4 with blocksize {QBLOCK}, got {quant_state.quant_type} / {quant_state.blocksize}")
        if packed_data.dtype != torch.uint8:
            raise ValueError(f"packed_data must be uint8 (quant_storage=torch.uint8), got {packed_data.dtype}")
        n, k = (int(s) for s in quant_state.shape)
        if k % QBLOCK:
            raise ValueError(f"K={k} is not a multiple of the quant block {QBLOCK}")
        kb = k // QBLOCK
        flat = packed_data.reshape(-1)[: n * k // 2]  # [N*K/2]: element 2i high nibble, 2i+1 low
        codes = torch.stack((flat >> 4, flat & 15), dim=1).reshape(n, kb, 2, 32)  # [N, KB, half, j]
        qweight = (codes[:, :, 0] | (codes[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
        absmax = quant_state.absmax.reshape(n, kb).t().contiguous()  # [KB, N]
        code = quant_state.code.to(device=packed_data.device, dtype=torch.float32).contiguous()
        if quant_state.nested:
            s2 = quant_state.state2
            return cls(qweight, absmax, s2.absmax.float().contiguous(), s2.code.float().contiguous(),
                       quant_state.offset.float().reshape(1), code, (n, k), quant_state.dtype,
                       int(s2.blocksize))
        return cls(qweight, absmax.float(), None, None, None, code, (n, k), quant_state.dtype)

    def to_bnb(self):
        """(packed_data [N*K/2, 1] uint8, QuantState): the inverse of `from_bnb`, bit for bit."""
        import bitsandbytes.functional as bnbf

        n, k = self.shape
        q = self.qweight.reshape(n, k // QBLOCK, 32)
        codes = torch.stack((q & 15, q >> 4), dim=2).reshape(-1, 2)  # [N*K/2, 2]: (even, odd) element
        packed = ((codes[:, 0] << 4) | codes[:, 1]).reshape(-1, 1)
        absmax = self.absmax.t().reshape(-1).contiguous()
        common = dict(shape=torch.Size((n, k)), dtype=self.dtype, blocksize=QBLOCK, code=self.code, quant_type="nf4")
        if not self.nested:
            return packed, bnbf.QuantState(absmax=absmax, **common)
        state2 = bnbf.QuantState(absmax=self.absmax2, code=self.code2, blocksize=self.nested_blocksize,
                                 dtype=torch.float32)
        return packed, bnbf.QuantState(absmax=absmax, offset=self.offset.reshape(()), state2=state2, **common)


def bnb_nbytes(packed_data: torch.Tensor, quant_state) -> int:
    """Bytes bitsandbytes holds for one 4-bit weight (to compare with `PackedNF4.nbytes`)."""
    parts = [packed_data, quant_state.absmax, quant_state.code]
    if quant_state.nested:
        parts += [quant_state.state2.absmax, quant_state.state2.code, quant_state.offset]
    return sum(t.numel() * t.element_size() for t in parts)


# --------------------------------------------------------------------------- Semantics


def nf4_matmul_ref(x: torch.Tensor, packed_data: torch.Tensor, quant_state, bias: torch.Tensor | None = None):
    """Semantics (x [M, K]; packed_data, quant_state as from quantize_4bit of W [N, K]; bias [N]):

        W = bitsandbytes.functional.dequantize_4bit(packed_data, quant_state as float32)  # [N, K]
        if x.dtype in (bfloat16, float16):
            W = W.to(x.dtype)              # as bitsandbytes' matmul_4bit rounds it
        y = x.float() @ W.float().T        # [M, N], fp32
        if bias is not None:
            y += bias.float()

    Returns y in fp32; `nf4_matmul` returns y rounded to x.dtype.
    """
    import bitsandbytes.functional as bnbf

    qs = quant_state
    qs32 = bnbf.QuantState(absmax=qs.absmax, shape=qs.shape, code=qs.code, blocksize=qs.blocksize,
                           quant_type=qs.quant_type, dtype=torch.float32, offset=qs.offset, state2=qs.state2)
    w = bnbf.dequantize_4bit(packed_data, qs32)  # [N, K] float32
    if x.dtype in (torch.bfloat16, torch.float16):
        w = w.to(x.dtype)
    y = x.float() @ w.float().t()
    if bias is not None:
        y = y + bias.float()
    return y


# --------------------------------------------------------------------------- kernels


@triton.jit
def _lookup(code_ptr, idx, ASM: tl.constexpr):
    """code[idx] for the 16-entry fp32 NF4 table. With ASM (GPU) the gather is inline PTX:
    Triton's pipeliner stages every load that feeds a dot through shared memory (cp.async,
    then ld.shared), tripling the L1/shared traffic of a lookup that is a one-line L1 hit."""
    if ASM:
        v = tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=f,l", [code_ptr + idx],
                                      dtype=tl.float32, is_pure=True, pack=1)
    else:
        v = tl.load(code_ptr + idx)
    return v


@triton.jit
def _block_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset, kb, offs_n, mask_n, N, KB,
                  NESTED: tl.constexpr, NESTED_BS: tl.constexpr):
    """[BN] fp32 absmax of quant block kb for rows offs_n, bit-identical to bitsandbytes':
    code2[q] * absmax2[i // 256] rounded, then + offset rounded (launches pass
    enable_fp_fusion=False so the two roundings are never merged into one fma)."""
    if NESTED:
        q = tl.load(absmax_ptr + kb * N + offs_n, mask=mask_n, other=0).to(tl.int32)
        a2 = tl.load(absmax2_ptr + (offs_n * KB + kb) // NESTED_BS, mask=mask_n, other=0.0)
        a = tl.load(code2_ptr + q) * a2 + offset
    else:
        a = tl.load(absmax_ptr + kb * N + offs_n, mask=mask_n, other=0.0)
    return a


@triton.jit
def _dequant_block(qw_ptr, code_ptr, absmax, kb, offs_n, mask_n, offs_j, HALF_K,
                   ROWS_FIRST: tl.constexpr, ASM: tl.constexpr):
    """Quant block kb of rows offs_n as two fp32 tiles (lo: k = kb*64 + j, hi: k = kb*64 + 32 + j),
    [BN, 32] if ROWS_FIRST else [32, BN]; each value is code * absmax, as bitsandbytes computes it."""
    if ROWS_FIRST:
        ptrs = qw_ptr + offs_n[:, None] * HALF_K + kb * 32 + offs_j[None, :]
        mask = mask_n[:, None]
        scale = absmax[:, None]
    else:
        ptrs = qw_ptr + offs_n[None, :] * HALF_K + kb * 32 + offs_j[:, None]
        mask = mask_n[None, :]
        scale = absmax[None, :]
    byte = tl.load(ptrs, mask=mask, other=0).to(tl.int32)
    lo = _lookup(code_ptr, byte & 15, ASM) * scale
    hi = _lookup(code_ptr, byte >> 4, ASM) * scale
    return lo, hi


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    if EMULATE:  # the interpreter's bf16 dot multiplies raw bits; fp32 holds the same values exactly
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _fma_tile(w, xt, acc):
    """acc[BN, 32, BM] += w[BN, 32] * xᵀ[32, BM], on CUDA cores (reduced over 32 after the loop)."""
    w3 = tl.broadcast_to(w.to(tl.float32)[:, :, None], acc.shape)
    x3 = tl.broadcast_to(xt.to(tl.float32)[None, :, :], acc.shape)
    return tl.fma(w3, x3, acc)


@triton.jit
def _nf4_matmul_kernel(
    x_ptr, qw_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, iters_per_split, split_stride,
    NESTED: tl.constexpr, NESTED_BS: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_K: tl.constexpr, SWAP_AB: tl.constexpr,
    USE_DOT: tl.constexpr, DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE: tl.constexpr,
    ASM: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] output tile over k-iterations [pid_k*ips, (pid_k+1)*ips) of
    GROUP_K quant blocks each. PARTIAL: store fp32 to workspace[pid_k] (split-K, reduced by
    _splitk_reduce_kernel); else add bias and store DTYPE. SWAP_AB computes the tile
    transposed (weights in the MMA's M slot, tokens in its N slot) for small M; without
    USE_DOT (BLOCK_M < 16, implies SWAP_AB) the products run on CUDA cores."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_j = tl.arange(0, 32)  # [32] byte column within a quant block
    mask_m = offs_m < M
    mask_n = offs_n < N
    KB = K // 64
    HALF_K = K // 2
    x_rows = x_ptr + offs_m.to(tl.int64) * stride_xm  # [BM]
    offset = 0.0
    if NESTED:
        offset = tl.load(offset_ptr)
    if not USE_DOT:
        acc = tl.zeros((BLOCK_N, 32, BLOCK_M), dtype=tl.float32)
    elif SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    it_start = pid_k * iters_per_split
    it_end = tl.minimum(it_start + iters_per_split, KB // GROUP_K)
    for it in range(it_start, it_end):
        for g in tl.static_range(GROUP_K):
            kb = it * GROUP_K + g
            absmax = _block_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset, kb, offs_n, mask_n, N, KB,
                                   NESTED, NESTED_BS)
            lo, hi = _dequant_block(qw_ptr, code_ptr, absmax, kb, offs_n, mask_n, offs_j, HALF_K, SWAP_AB, ASM)
            lo = round_to(lo, DTYPE, EMULATE)
            hi = round_to(hi, DTYPE, EMULATE)
            k0 = kb * 64
            if SWAP_AB:  # acc[BN, BM] += w[BN, 32] @ xᵀ[32, BM]
                x_lo = tl.load(x_rows[None, :] + k0 + offs_j[:, None], mask=mask_m[None, :], other=0.0)
                x_hi = tl.load(x_rows[None, :] + k0 + 32 + offs_j[:, None], mask=mask_m[None, :], other=0.0)
                if USE_DOT:
                    acc = _mma(lo, x_lo, acc, DOT_PRECISION, EMULATE)
                    acc = _mma(hi, x_hi, acc, DOT_PRECISION, EMULATE)
                else:
                    acc = _fma_tile(lo, x_lo, acc)
                    acc = _fma_tile(hi, x_hi, acc)
            else:  # acc[BM, BN] += x[BM, 32] @ wᵀ[32, BN]
                x_lo = tl.load(x_rows[:, None] + k0 + offs_j[None, :], mask=mask_m[:, None], other=0.0)
                x_hi = tl.load(x_rows[:, None] + k0 + 32 + offs_j[None, :], mask=mask_m[:, None], other=0.0)
                acc = _mma(x_lo, lo, acc, DOT_PRECISION, EMULATE)
                acc = _mma(x_hi, hi, acc, DOT_PRECISION, EMULATE)
    if not USE_DOT:
        acc = tl.sum(acc, axis=1)  # [BN, BM]
    if SWAP_AB:
        offs = offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None]
        mask = mask_n[:, None] & mask_m[None, :]
    else:
        offs = offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
    if PARTIAL:
        tl.store(out_ptr + pid_k.to(tl.int64) * split_stride + offs, acc, mask=mask)
    else:
        if HAS_BIAS:
            b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            if SWAP_AB:
                acc += b[:, None]
            else:
                acc += b[None, :]
        tl.store(out_ptr + offs, round_to(acc, DTYPE, EMULATE), mask=mask)


@triton.jit
def _splitk_reduce_kernel(part_ptr, bias_ptr, out_ptr, MN, N, SPLIT_K, stride_om,
                          HAS_BIAS: tl.constexpr, DTYPE: tl.constexpr, EMULATE: tl.constexpr, BLOCK: tl.constexpr):
    """out[m, n] = sum over s in order of part[s, m, n] (+ bias[n]): deterministic split-K."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # flat m*N + n
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = part_ptr + offs
    for s in range(SPLIT_K):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += MN
    n = offs % N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + (offs // N) * stride_om + n, round_to(acc, DTYPE, EMULATE), mask=mask)


@triton.jit
def _nf4_dequant_kernel(qw_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, N, K,
                        NESTED: tl.constexpr, NESTED_BS: tl.constexpr, BLOCK_N: tl.constexpr,
                        GROUP_K: tl.constexpr, DTYPE: tl.constexpr, EMULATE: tl.constexpr, ASM: tl.constexpr):
    """out[n, k] = code[q(n, k)] * absmax(n, k // 64) rounded to DTYPE, for one [BLOCK_N, GROUP_K*64] tile."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, 32)
    mask_n = offs_n < N
    offset = 0.0
    if NESTED:
        offset = tl.load(offset_ptr)
    rows = out_ptr + offs_n.to(tl.int64)[:, None] * K + offs_j[None, :]  # [BN, 32]
    for g in tl.static_range(GROUP_K):
        kb = tl.program_id(1) * GROUP_K + g
        absmax = _block_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset, kb, offs_n, mask_n, N, K // 64,
                               NESTED, NESTED_BS)
        lo, hi = _dequant_block(qw_ptr, code_ptr, absmax, kb, offs_n, mask_n, offs_j, K // 2, True, ASM)
        tl.store(rows + kb * 64, round_to(lo, DTYPE, EMULATE), mask=mask_n[:, None])
        tl.store(rows + kb * 64 + 32, round_to(hi, DTYPE, EMULATE), mask=mask_n[:, None])


# --------------------------------------------------------------------------- configs and policy


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # tokens per tile; < 16 runs the products on CUDA cores (no tl.dot)
    block_n: int  # weight rows per tile
    group_k: int  # quant blocks (64 k) per loop iteration; lowered to a power of two dividing K/64
    swap_ab: bool  # compute the tile transposed: weights fill the MMA's M slot, tokens its N slot
    num_warps: int
    num_stages: int
    split_k: int = 0  # 0: chosen so the grid has ctas_per_sm CTAs per SM (`_plan`); 1: off
    ctas_per_sm: int = 2  # split-K target

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "group_k"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two, got {v}")
        if self.block_n < 16:
            raise ValueError("block_n must be >= 16")
        if self.block_m < 16 and not self.swap_ab:
            raise ValueError("block_m < 16 (CUDA-core products) needs swap_ab")
        if self.split_k < 0 or self.ctas_per_sm < 1:
            raise ValueError("split_k must be >= 0 and ctas_per_sm >= 1")

    @property
    def use_dot(self) -> bool:
        return self.block_m >= 16


# Tile table. UNMEASURED priors until bench/nf4_matmul.py runs on an H100 (`--sweep`
# times candidates per shape and M); each says why it was chosen. The register and
# shared-memory figures are compiler-checked, not timed: tests/kernels/test_compile_sm90.py
# builds every bf16 config `config_for` picks at Llama-3-8B's and the tiny model's shapes
# for sm_90 and fails on a spill. The arithmetic behind
# them, for an H100 (132 SMs, ~1.75 GHz, 3.35 TB/s): streaming 4.13-bit weights at full
# bandwidth needs ~26 weights per clock per SM; the NF4 lookup is one L1 wavefront per 32
# weights (the 64-byte table is one line), which caps any variant at 32 weights/clk/SM.
# gemv (M <= 2): CUDA-core products, no tensor cores. ALU per weight ~5.5 + M ops
#   (unpack, lookup address, scale, bf16 round, M fmas) -> ~20 weights/clk/SM at M = 1,
#   17 at M = 2; the tensor-core path is bound near 16 by the L1/shared traffic of the
#   lookup plus staging the dequantized tile, so it takes over from M = 3. No dot means
#   no cp.async pipelining: latency is hidden by occupancy and by GROUP_K = 4 independent
#   loads per iteration. 8 warps keep it at 48 registers (80 with double quantization;
#   offline sm_90 compile; 4 warps need 96-128, and M = 4 spills) -> 3 CTAs per SM, which
#   split-K provides, never with splits of one iteration (`_plan`: those spill).
GEMV = TileConfig(block_m=1, block_n=64, group_k=4, swap_ab=True, num_warps=8, num_stages=1, ctas_per_sm=3)
# decode (M 3..16): tokens pad to 16 in the MMA's N slot and 64 weight rows fill a wgmma
#   m64 with the weights as the register operand. A stage is 64 rows x 256 k = 8 KiB of
#   weight; 3 stages keep ~16-24 KiB in flight per CTA, near the ~18 KiB/SM that Little's
#   law asks of HBM3 (3.35 TB/s x ~0.7 us / 132 SMs), at 53 KiB of shared memory per
#   CTA and 80 registers (offline sm_90 compile), so 2-3 CTAs fit per SM.
DECODE = TileConfig(block_m=16, block_n=64, group_k=4, swap_ab=True, num_warps=4, num_stages=3)
# mid (M 17..256): weight-bound up to M ~ 75 (2M flop per 0.52 B of weight against the
#   H100's ~295 flop/B), compute-bound past it; block_m is M rounded up to 32 or 64 so at
#   most half a tile is padding, 128 weight rows per tile halve the re-reads of x, and
#   swap-AB keeps the weights as the register operand of wgmma (offline sm_90 compile,
#   Triton 3.9: block_m 64 147-203 regs, 84-86 KiB shared; block_m 32 94-118 regs,
#   37-61 KiB; no spills).
MID = TileConfig(block_m=64, block_n=128, group_k=2, swap_ab=True, num_warps=4, num_stages=3)
# prefill: compute-bound; the Triton matmul tutorial's H100 bf16 tile (128x128, k 64 per
#   stage, 8 warps, 3 stages), with block_n 128 rather than 256 to leave registers for
#   the dequantization (offline sm_90 compile: 130-142 regs, 74-76 KiB shared, no spills).
PREFILL = TileConfig(block_m=128, block_n=128, group_k=1, swap_ab=False, num_warps=8, num_stages=3)
# fp32 activations use IEEE fp32 dots on CUDA cores, which spill above 64x32 tiles
# (offline sm_90 compile: 128x128 needs ~11 KB of stack per thread); a correctness path.
FP32 = TileConfig(block_m=16, block_n=64, group_k=1, swap_ab=True, num_warps=4, num_stages=2)
GEMV_MAX_M = 2
DECODE_MAX_M = 16
MID_MAX_M = 256
MAX_SPLIT_K = 16  # bounds the fp32 workspace (split_k x M x N) and the reduce's reads
_INTERPRETER_SMS = 4  # pretend SM count off-GPU, small so CPU tests exercise split-K

# Shapes (N, K) where the H100 bench finds bitsandbytes faster at some M, so the engine
# keeps bitsandbytes for them. Empty: UNMEASURED. The prior is that the fused kernel
# wins from M = 2 on (bitsandbytes' batched path moves the weight ~5 times) and at
# least matches its GEMV at M = 1; bench/nf4_matmul.py reports the per-shape verdict.
BNB_FASTER_SHAPES: frozenset = frozenset()


def _with_block_m(cfg: TileConfig, block_m: int) -> TileConfig:
    return TileConfig(block_m, cfg.block_n, cfg.group_k, cfg.swap_ab, cfg.num_warps, cfg.num_stages,
                      cfg.split_k, cfg.ctas_per_sm)


def config_for(m: int, dtype: torch.dtype = torch.bfloat16) -> TileConfig:
    """The tile config of M's range: gemv (M <= 2), decode (<= 16), mid (<= 256), prefill."""
    if dtype == torch.float32:
        return FP32 if m > GEMV_MAX_M else _with_block_m(GEMV, triton.next_power_of_2(m))
    if m <= GEMV_MAX_M:
        return _with_block_m(GEMV, triton.next_power_of_2(m))
    if m <= DECODE_MAX_M:
        return DECODE
    if m <= MID_MAX_M:
        return _with_block_m(MID, 32 if m <= 32 else 64)
    return PREFILL


def use_triton_nf4(n: int, k: int, device: torch.device | str) -> bool:
    """Whether the engine should repack an [n, k] NF4 weight and use `nf4_matmul` on `device`
    (decided once per shape at load; bitsandbytes is the CPU path and the fallback)."""
    device = torch.device(device)
    if device.type != "cuda" or k % QBLOCK or not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability(device) < (8, 0):  # bf16 MMA and cp.async from sm80
        return False
    return (n, k) not in BNB_FASTER_SHAPES


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


def _plan(cfg: TileConfig, m: int, n: int, k: int, num_sms: int) -> tuple[int, int, int]:
    """(group_k, split_k, iters_per_split) for one launch; no split is left empty."""
    kb = k // QBLOCK
    group = cfg.group_k
    while kb % group:
        group //= 2
    iters = kb // group
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    if cfg.split_k:
        split = cfg.split_k
    else:
        split = min(max(1, cfg.ctas_per_sm * num_sms // tiles), MAX_SPLIT_K)
        # >= 2 iterations per split: a split of one makes Triton specialize iters_per_split
        # to the constant 1, and the GEMV then spills on sm_90 (K 4096, N 1024, M 1: 40 regs,
        # 8-byte stack frame; with 2: 48 regs, none; offline compile, tests/kernels/
        # test_compile_sm90.py). Such a split also writes an fp32 partial tile of up to
        # half the bytes of weight it reads (DECODE: 4 KiB per 8 KiB).
        split = min(split, max(1, iters - 1))
    per_split = triton.cdiv(iters, min(split, iters))
    return group, triton.cdiv(iters, per_split), per_split


# --------------------------------------------------------------------------- launchers

_TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
LOOKUP_VIA_ASM = True  # GPU lookups through inline PTX (`_lookup`); False: plain tl.load


def _scale_args(p: PackedNF4):
    if p.nested:
        return p.absmax, p.absmax2, p.code2, p.offset
    return p.absmax, p.absmax, p.absmax, p.absmax  # unused pointers when not NESTED


def _device_ctx(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def nf4_matmul(x: torch.Tensor, p: PackedNF4, bias: torch.Tensor | None = None, *,
               out: torch.Tensor | None = None, config: TileConfig | None = None) -> torch.Tensor:
    """y = x @ dequant(p)ᵀ (+ bias), fused (Semantics: `nf4_matmul_ref`).

    x: [M, K] bfloat16 / float16 / float32, unit stride along K; p: PackedNF4 of [N, K];
    bias: [N] (any float dtype); out: optional [M, N] of x.dtype, contiguous.
    Returns [M, N] of x.dtype. Accumulates in fp32; fp32 activations use IEEE fp32 products.
    config: a TileConfig to force (tests, bench); default `config_for(M, x.dtype)`. Split-K
    reduces in a second, deterministic pass (fixed order), never with atomics.
    """
    n, k = p.shape
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got {list(x.shape)}")
    if x.dtype not in _TL_DTYPE:
        raise ValueError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    if x.stride(1) != 1:
        raise ValueError("x must have unit stride along K")
    if x.device != p.device:
        raise ValueError(f"x is on {x.device}, the weight on {p.device}")
    if bias is not None and (bias.shape != (n,) or bias.device != x.device):
        raise ValueError(f"bias must be [{n}] on {x.device}")
    bias = bias.contiguous() if bias is not None else None
    m = x.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{m}, {n}] {x.dtype} tensor")
    if m == 0:
        return out
    cfg = config or config_for(m, x.dtype)
    group, split, per_split = _plan(cfg, m, n, k, _num_sms(x.device))
    emulate = x.device.type != "cuda"
    dtype = _TL_DTYPE[x.dtype]
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit operands
    bias_arg = bias if bias is not None else out
    dest = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
    with _device_ctx(x.device):
        _nf4_matmul_kernel[grid](
            x, p.qweight, p.code, *_scale_args(p), bias_arg, dest,
            m, n, k, x.stride(0), n, per_split, m * n,
            NESTED=p.nested, NESTED_BS=p.nested_blocksize, HAS_BIAS=bias is not None, PARTIAL=split > 1,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, GROUP_K=group, SWAP_AB=cfg.swap_ab, USE_DOT=cfg.use_dot,
            DTYPE=dtype, DOT_PRECISION=precision, EMULATE=emulate, ASM=LOOKUP_VIA_ASM and not emulate,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
        )
        if split > 1:
            block = 1024  # elementwise pass; any size that keeps the grid small works
            _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
                dest, bias_arg, out, m * n, n, split, n,
                HAS_BIAS=bias is not None, DTYPE=dtype, EMULATE=emulate, BLOCK=block, num_warps=4,
            )
    return out


def dequantize_packed(p: PackedNF4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, K] weight of `dtype`, through the same Triton helpers as `nf4_matmul`;
    bit-identical to bitsandbytes' dequantize_4bit (to fp32, then `.to(dtype)`)."""
    if dtype not in _TL_DTYPE:
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    n, k = p.shape
    out = torch.empty((n, k), dtype=dtype, device=p.device)
    kb = k // QBLOCK
    group = 4  # 64 rows x 256 k per program: 32-64 KiB out, enough to stream
    while kb % group:
        group //= 2
    block_n = 64
    emulate = p.device.type != "cuda"
    with _device_ctx(p.device):
        _nf4_dequant_kernel[(triton.cdiv(n, block_n), kb // group)](
            p.qweight, p.code, *_scale_args(p), out, n, k,
            NESTED=p.nested, NESTED_BS=p.nested_blocksize, BLOCK_N=block_n, GROUP_K=group,
            DTYPE=_TL_DTYPE[dtype], EMULATE=emulate, ASM=LOOKUP_VIA_ASM and not emulate,
            num_warps=4, enable_fp_fusion=False,
        )
    return out
