"""Base linears of the decoder, one per group of slices that read the same input (q|k|v,
gate|up, or one module alone). One interface for dense and NF4 weights, so the adapter
layers never ask which format they wrap:

    y = base(x)            # x: [T, in] -> [T, sum out_i]: one matmul for the whole group
    base.widths            # (out_i, ...) per slice, in the order of the group's names
    base.dense_weight(i)   # [out_i, in] float32, slice i as the forward sees it

The slices' weights are stacked along out at load (`DenseLinear.stack`, `nf4_group`).
NF4 slices are quantized one by one, as PEFT's Linear4bit quantizes each module, and
stacked after (quantize.stack_nf4), so the 4-bit values stay PEFT's bit for bit. When a
group's in_features is not a multiple of the quant block, NF4 storage cannot be stacked
and the group falls back to one matmul per slice and a cat (`SlicedLinear`).
No bias here: the adapter layer adds it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from loraplex.server.model.quantize import (
    QuantSpec,
    can_stack_nf4,
    dequantize_nf4,
    nf4_params,
    slice_nf4,
    stack_nf4,
)


def _row0(widths: Sequence[int], i: int) -> int:
    return sum(widths[:i])


class DenseLinear(nn.Module):
    """Unquantized weight of a group (for --quantize none and comparisons)."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, widths: Sequence[int] | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight.to(dtype), requires_grad=False)  # [sum out, in]
        self.widths = tuple(widths) if widths is not None else (weight.shape[0],)
        if sum(self.widths) != weight.shape[0]:
            raise ValueError(f"widths {self.widths} do not add up to the weight's {weight.shape[0]} rows")

    @classmethod
    def stack(cls, weights: Sequence[torch.Tensor], dtype: torch.dtype) -> "DenseLinear":
        """One group from the slices' [out_i, in] weights."""
        return cls(torch.cat(list(weights)), dtype, [w.shape[0] for w in weights])

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()

    def dense_weight(self, i: int) -> torch.Tensor:
        row0 = _row0(self.widths, i)
        return self.weight[row0 : row0 + self.widths[i]].float()


NF4_BACKENDS = ("bnb", "auto", "triton")


class NF4Linear(nn.Module):
    """NF4 weight [sum out, in] (blocksize 64), multiplied by bitsandbytes or by our fused
    Triton kernel (kernels/nf4_matmul.py), one launch for the group. backend: "bnb";
    "auto" = Triton where `use_triton_nf4` picks it for this shape and device; "triton" =
    always Triton. With Triton the weight is repacked once and bitsandbytes' copy is dropped.

    params: one slice as quantized (double quantization allowed), or several slices stacked
    by `quantize.stack_nf4` (float32 absmax, not nested; see there for the cost)."""

    def __init__(self, params, widths: Sequence[int], dtype: torch.dtype, backend: str = "bnb"):
        super().__init__()
        if backend not in NF4_BACKENDS:
            raise ValueError(f"nf4 backend must be one of {NF4_BACKENDS}, not {backend!r}")
        out_features, in_features = (int(s) for s in params.quant_state.shape)
        self.widths = tuple(widths)
        if sum(self.widths) != out_features:
            raise ValueError(f"widths {self.widths} do not add up to the weight's {out_features} rows")
        if len(self.widths) > 1 and params.quant_state.nested:
            raise ValueError("a stacked NF4 weight keeps float32 absmax (quantize.stack_nf4)")
        self.compute_dtype = dtype
        self.packed = None  # PackedNF4 when the Triton kernel serves this layer
        self.weight = params  # bitsandbytes Params4bit, packed [out * in / 2, 1] uint8
        if backend != "bnb":
            from loraplex.kernels.nf4_matmul import PackedNF4, use_triton_nf4

            if backend == "triton" or use_triton_nf4(out_features, in_features, params.device):
                self.packed = PackedNF4.from_bnb(params.data, params.quant_state)
                self.weight = None

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype, spec: QuantSpec, backend: str = "bnb") -> "NF4Linear":
        """One slice from its dense [out, in] weight."""
        return cls(nf4_params(weight.float(), spec), [weight.shape[0]], dtype, backend)

    @property
    def out_features(self) -> int:
        return sum(self.widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            from loraplex.kernels.nf4_matmul import nf4_matmul

            return nf4_matmul(x, self.packed)
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x, self.weight.t(), bias=None, quant_state=self.weight.quant_state)

    def dense_weight(self, i: int) -> torch.Tensor:
        """Dequantizes slice i only (not the whole stack)."""
        row0, rows = _row0(self.widths, i), self.widths[i]
        if self.packed is not None:
            from loraplex.kernels.nf4_matmul import PackedNF4, dequantize_packed

            p = self.packed
            if len(self.widths) > 1:  # a stack: float32 absmax [K/64, N], rows are columns of it
                p = PackedNF4(p.qweight[row0 : row0 + rows], p.absmax[:, row0 : row0 + rows].contiguous(),
                              None, None, None, p.code, (rows, p.shape[1]), p.dtype)
            return dequantize_packed(p, torch.float32)
        if len(self.widths) == 1:
            return dequantize_nf4(self.weight)
        import bitsandbytes.functional as bnbf

        data, state = slice_nf4(self.weight, row0, rows)
        return bnbf.dequantize_4bit(data, state).float()


class SlicedLinear(nn.Module):
    """A group whose slices cannot share one matmul: one per slice, then a cat. Used for NF4
    groups with in_features % 64 != 0 (quant blocks cross rows, so storage does not stack)."""

    def __init__(self, parts: Sequence[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)  # single-slice bases
        self.widths = tuple(p.out_features for p in parts)

    @property
    def out_features(self) -> int:
        return sum(self.widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [p(x) for p in self.parts]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def dense_weight(self, i: int) -> torch.Tensor:
        return self.parts[i].dense_weight(0)


def nf4_group(parts: Sequence, dtype: torch.dtype, backend: str = "bnb") -> nn.Module:
    """The base of one group from its slices' NF4 `Params4bit`s ([out_i, in] each): one
    NF4Linear over the stacked storage, or a SlicedLinear where the storage cannot stack."""
    widths = [int(p.quant_state.shape[0]) for p in parts]
    if len(parts) == 1:
        return NF4Linear(parts[0], widths, dtype, backend)  # kept as quantized (nested absmax stays 8-bit)
    in_features = int(parts[0].quant_state.shape[1])
    if not can_stack_nf4(in_features, parts[0].quant_state.blocksize):
        return SlicedLinear([NF4Linear(p, [w], dtype, backend) for p, w in zip(parts, widths)])
    return NF4Linear(stack_nf4(parts), widths, dtype, backend)
