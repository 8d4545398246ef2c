"""silu_mul: the SwiGLU activation of the Llama MLP, silu(gate) * up, from the fused
gate|up projection output in one pass.

`silu_mul_ref` is the Semantics and the CPU backend: exactly DecoderLayer's
`gate, up = gate_up.chunk(2, dim=-1); F.silu(gate) * up`, op for op. `silu_mul` is the
Triton kernel's launcher, drop-in on CUDA. Both take an optional preallocated `out`.
Only `out` is written; it must not overlap `gate_up`.

gate_up is [T, 2I] with gate the first I columns and up the last I; its row stride may
be larger than 2I (a slice of a wider buffer), its column stride must be 1.

Kernel layout: one program per (row, block of BLOCK columns); grid (T, cdiv(I, BLOCK))
from the shapes only, and the launcher never reads a device tensor back (CUDA-graph
capturable). Math in fp32, rounded to the dtype where the ref rounds: silu(gate) once,
then the product. So the only difference from the ref is exp's implementation (GPU
ex2.approx vs torch's expf: an fp32 ulp or two in silu), which for 16-bit dtypes can
flip a rounding of silu(gate) by one ulp in rare elements. In Triton's interpreter the
bf16 roundings are done on the bits (`kernels/rounding.py`), as the interpreter truncates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from loraplex.kernels.rounding import round_to

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Columns per program: 1024 16-bit elements = 2 KiB of gate and of up per program, 4 warps
# (8 elements a thread). Chosen by reasoning, not yet measured (bench/elementwise.py).
BLOCK = 1024


@triton.jit
def _silu_mul_kernel(
    gu_ptr,  # [T, 2I], row stride stride_gu, unit column stride
    out_ptr,  # [T, I], row stride stride_o, unit column stride
    inter,  # I
    stride_gu,
    stride_o,
    BLOCK: tl.constexpr,
    EMULATE: tl.constexpr,  # round to bf16 on the bits (the interpreter)
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] columns of out
    mask = offs < inter
    gate = tl.load(gu_ptr + row * stride_gu + offs, mask=mask, other=0.0)
    up = tl.load(gu_ptr + row * stride_gu + inter + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    s = round_to(g / (1.0 + tl.exp(-g)), gate.dtype, EMULATE)  # F.silu, rounded as the ref rounds it
    y = round_to(s.to(tl.float32) * up.to(tl.float32), gate.dtype, EMULATE)
    tl.store(out_ptr + row * stride_o + offs, y, mask=mask)


def silu_mul(
    gate_up: torch.Tensor,  # [T, 2I], unit column stride, any row stride
    out: torch.Tensor | None = None,  # [T, I] gate_up.dtype, unit column stride, written (allocated if None)
) -> torch.Tensor:  # [T, I]
    """Triton `silu_mul_ref`: same Semantics."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or (gate_up.shape[1] > 1 and gate_up.stride(1) != 1):
        raise ValueError(
            f"gate_up must be [T, 2I] with unit column stride, got {tuple(gate_up.shape)} strides {gate_up.stride()}"
        )
    if gate_up.dtype not in DTYPES:
        raise TypeError(f"gate_up dtype {gate_up.dtype} not supported (fp32, bf16, fp16)")
    num_tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    if out is None:
        out = torch.empty(num_tokens, inter, dtype=gate_up.dtype, device=gate_up.device)
    elif (
        out.dim() != 2 or tuple(out.shape) != (num_tokens, inter) or out.dtype != gate_up.dtype
        or out.device != gate_up.device or (inter > 1 and out.stride(1) != 1)
    ):  # fmt: skip
        raise ValueError(f"out must be [{num_tokens}, {inter}] {gate_up.dtype} with unit column stride")
    if num_tokens == 0 or inter == 0:
        return out
    block = min(BLOCK, triton.next_power_of_2(inter))
    grid = (num_tokens, triton.cdiv(inter, block))
    _silu_mul_kernel[grid](
        gate_up, out, inter, gate_up.stride(0), out.stride(0), BLOCK=block, EMULATE=gate_up.device.type != "cuda", num_warps=4
    )
    return out


def silu_mul_ref(
    gate_up: torch.Tensor,  # [T, 2I]
    out: torch.Tensor | None = None,  # [T, I], written (allocated if None)
) -> torch.Tensor:  # [T, I]
    """Semantics:

        gate, up = gate_up.chunk(2, dim=-1)   # [T, I] each
        return F.silu(gate) * up              # DecoderLayer's MLP activation, op for op
    """
    gate, up = gate_up.chunk(2, dim=-1)
    if out is None:
        return F.silu(gate) * up
    return torch.mul(F.silu(gate), up, out=out)
