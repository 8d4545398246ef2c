"""Base linear layers of the decoder: one interface for dense and NF4 weights, so the
adapter layers never ask which format they wrap.

    y = base(x)            # x: [T, in] -> [T, out], no bias (the adapter layer adds it)
    base.dense_weight()    # [out, in] float32, as the forward sees it
"""

from __future__ import annotations

import torch
from torch import nn

from loraplex.server.model.quantize import QuantSpec, dequantize_nf4, nf4_params


class DenseLinear(nn.Module):
    """Unquantized weight (for --quantize none and comparisons)."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(weight.to(dtype), requires_grad=False)  # [out, in]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()

    def dense_weight(self) -> torch.Tensor:
        return self.weight.float()


NF4_BACKENDS = ("bnb", "auto", "triton")


class NF4Linear(nn.Module):
    """NF4 weight (blocksize 64, optional double quantization), multiplied by bitsandbytes
    or by our fused Triton kernel (kernels/nf4_matmul.py). backend: "bnb"; "auto" = Triton
    where `use_triton_nf4` picks it for this shape and device; "triton" = always Triton.
    With Triton the weight is repacked once and bitsandbytes' copy is dropped."""

    def __init__(self, params, out_features: int, dtype: torch.dtype, backend: str = "bnb"):
        super().__init__()
        if backend not in NF4_BACKENDS:
            raise ValueError(f"nf4 backend must be one of {NF4_BACKENDS}, not {backend!r}")
        self._out = out_features
        self.compute_dtype = dtype
        self.packed = None  # PackedNF4 when the Triton kernel serves this layer
        self.weight = params  # bitsandbytes Params4bit, packed [out * in / 2, 1] uint8
        if backend != "bnb":
            from loraplex.kernels.nf4_matmul import PackedNF4, use_triton_nf4

            in_features = params.quant_state.shape[1]
            if backend == "triton" or use_triton_nf4(out_features, in_features, params.device):
                self.packed = PackedNF4.from_bnb(params.data, params.quant_state)
                self.weight = None

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype, spec: QuantSpec, backend: str = "bnb") -> "NF4Linear":
        return cls(nf4_params(weight.float(), spec), weight.shape[0], dtype, backend)

    @property
    def out_features(self) -> int:
        return self._out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            from loraplex.kernels.nf4_matmul import nf4_matmul

            return nf4_matmul(x, self.packed)
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x, self.weight.t(), bias=None, quant_state=self.weight.quant_state)

    def dense_weight(self) -> torch.Tensor:
        if self.packed is not None:
            from loraplex.kernels.nf4_matmul import dequantize_packed

            return dequantize_packed(self.packed, torch.float32)
        return dequantize_nf4(self.weight)
