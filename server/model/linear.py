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


class NF4Linear(nn.Module):
    """bitsandbytes NF4 weight (blocksize 64, optional double quantization)."""

    def __init__(self, params, out_features: int, dtype: torch.dtype):
        super().__init__()
        self.weight = params  # bitsandbytes Params4bit, packed [out * in / 2, 1] uint8
        self._out = out_features
        self.compute_dtype = dtype

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype, spec: QuantSpec) -> "NF4Linear":
        return cls(nf4_params(weight.float(), spec), weight.shape[0], dtype)

    @property
    def out_features(self) -> int:
        return self._out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x, self.weight.t(), bias=None, quant_state=self.weight.quant_state)

    def dense_weight(self) -> torch.Tensor:
        return dequantize_nf4(self.weight)
