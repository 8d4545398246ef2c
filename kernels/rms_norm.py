"""rms_norm: Llama's RMSNorm over the last dim, optionally fused with the residual add
that precedes it in the decoder (`h = h + delta; x = norm(h)`).

`rms_norm_ref` is the Semantics and the CPU backend: exactly `RMSNorm.forward` of
server/model/llama.py (and, with a residual, the decoder's `h + delta` before it), op for
op, so a model running it stays bit-identical to today's. `rms_norm` is the Triton
kernel's launcher, drop-in on CUDA. Both take an optional preallocated `out`.

In-place contract (with `residual`): `residual` [T, hidden] is overwritten with
h = residual + x (rounded to x.dtype, as the torch add is) and returned as the second
result; y = norm(h) goes to `out` (or a new tensor). `x` is only read. Without
`residual`, nothing but `out` is written. `out` may be `x` itself (each row is read
whole before it is written); it must not overlap `residual` or `weight`.

Kernel layout: one program per row, the whole row (hidden <= MAX_HIDDEN) in registers as
fp32. It rounds to x.dtype at the ref's rounding points (h, then the normalized row before
the weight product, then the product), so for 16-bit dtypes the only differences from the
ref are the order of the fp32 sum of squares and the rsqrt (one fp32 ulp or two), which
can flip the rounding of the normalized row to x.dtype by one ulp in rare elements (fp32:
a few fp32 ulps). In Triton's interpreter the bf16 roundings are done on the bits
(`kernels/rounding.py`), as the interpreter truncates. The grid is (T,), from the shape only; the launcher never reads a device tensor back, so a
launch is CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraplex.kernels.rounding import round_to

MAX_HIDDEN = 8192  # one row in one program's registers (Llama-3-8B: 4096; 70B: 8192)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [T, hidden], row stride stride_x, unit column stride
    w_ptr,  # [hidden] contiguous
    res_ptr,  # [T, hidden], row stride stride_r (unused unless HAS_RESIDUAL): read, then h written
    out_ptr,  # [T, hidden], row stride stride_o
    hidden,
    stride_x,
    stride_r,
    stride_o,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,  # next power of 2 >= hidden
    EMULATE: tl.constexpr,  # round to bf16 on the bits (the interpreter)
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)  # [BLOCK]
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        h = round_to(r.to(tl.float32) + x.to(tl.float32), x.dtype, EMULATE)  # the torch add, rounded to x.dtype
        tl.store(res_ptr + row * stride_r + offs, h, mask=mask)
        x = h
    xf = x.to(tl.float32)
    mean_sq = tl.sum(xf * xf, axis=0) / hidden  # masked lanes are 0
    xn = round_to(xf * tl.rsqrt(mean_sq + eps), x.dtype, EMULATE)  # the ref's x.to(dtype) before the weight
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    y = round_to(w.to(tl.float32) * xn.to(tl.float32), x.dtype, EMULATE)
    tl.store(out_ptr + row * stride_o + offs, y, mask=mask)


def _num_warps(block: int) -> int:
    """Warps per row program: ~8 elements per thread up to 16 warps. Chosen by reasoning
    (Liger-Kernel's rule), not yet measured (bench/elementwise.py reports the numbers)."""
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


def _check_2d(name: str, t: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> None:
    if t.dim() != 2 or tuple(t.shape) != shape or t.dtype != dtype or t.device != device:
        raise ValueError(f"{name} must be {list(shape)} {dtype} on {device}, got {tuple(t.shape)} {t.dtype} on {t.device}")
    if shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have unit column stride, got strides {t.stride()}")


def rms_norm(
    x: torch.Tensor,  # [T, hidden], unit column stride
    weight: torch.Tensor,  # [hidden] contiguous, x.dtype
    eps: float,
    residual: torch.Tensor | None = None,  # [T, hidden] x.dtype: h = residual + x written here (in place)
    out: torch.Tensor | None = None,  # [T, hidden] x.dtype, written (allocated if None); may be x
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # y [T, hidden], or (y, residual) with a residual
    """Triton `rms_norm_ref`: same Semantics and in-place contract."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be [T, hidden] with unit column stride, got {tuple(x.shape)} strides {x.stride()}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x dtype {x.dtype} not supported (fp32, bf16, fp16)")
    num_tokens, hidden = x.shape
    if not 0 < hidden <= MAX_HIDDEN:
        raise ValueError(f"hidden {hidden} out of range (1..{MAX_HIDDEN})")
    if weight.shape != (hidden,) or weight.dtype != x.dtype or weight.device != x.device or not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous [{hidden}] {x.dtype}, got {tuple(weight.shape)} {weight.dtype}")
    if residual is not None:
        _check_2d("residual", residual, (num_tokens, hidden), x.dtype, x.device)
    if out is None:
        out = torch.empty(num_tokens, hidden, dtype=x.dtype, device=x.device)
    else:
        _check_2d("out", out, (num_tokens, hidden), x.dtype, x.device)
    result = out if residual is None else (out, residual)
    if num_tokens == 0:
        return result
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(num_tokens,)](
        x, weight, residual if residual is not None else x, out,
        hidden, x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), float(eps),
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        EMULATE=x.device.type != "cuda",
        num_warps=_num_warps(block),
    )  # fmt: skip
    return result


def rms_norm_ref(
    x: torch.Tensor,  # [T, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, hidden] x.dtype: h = residual + x written here (in place)
    out: torch.Tensor | None = None,  # [T, hidden], written (allocated if None); may be x
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # y [T, hidden], or (y, residual) with a residual
    """Semantics:

        if residual is not None:
            residual += x                     # in x.dtype, in place: the decoder's h = h + delta
            x = residual
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = weight * xf.to(dtype)             # RMSNorm.forward, op for op
        return y if residual is None else (y, residual)
    """
    if residual is not None:
        residual.add_(x)
        x = residual
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * xf.to(dtype)
    if out is not None:
        out.copy_(y)
        y = out
    return y if residual is None else (y, residual)
