"""`round_to`: fp32 → a kernel's output dtype, rounding to nearest even on every backend.

Triton's interpreter (3.9) truncates fp32 → bf16 where a GPU rounds to nearest, so with
EMULATE (the launchers pass it when the interpreter runs) the rounding is done on the
bits; on a GPU it is one cvt. Shared by the kernels whose tests compare them bit for bit
with torch references (nf4_matmul, rms_norm, silu_mul, rope_kv)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to(v, DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    if EMULATE:
        if DTYPE == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)
    return v.to(DTYPE)
