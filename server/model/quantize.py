"""NF4 quantization of linear weights with bitsandbytes, shared by the model runner,
the trainer and the PEFT oracle, so every side of a comparison holds the same 4-bit
values (blocksize 64, double quantization of absmax on by default)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

NF4_BLOCKSIZE = 64


@dataclass(frozen=True)
class QuantSpec:
    """How decoder linears are stored. mode "nf4" (bitsandbytes 4-bit) or "none" (dense)."""

    mode: str = "nf4"
    double_quant: bool = True
    blocksize: int = NF4_BLOCKSIZE

    def __post_init__(self) -> None:
        if self.mode not in ("nf4", "none"):
            raise ValueError(f"quantize must be 'nf4' or 'none', not {self.mode!r}")


def nf4_params(weight: torch.Tensor, spec: QuantSpec = QuantSpec()):
    """Quantizes a dense [out, in] weight into a bitsandbytes `Params4bit` (on weight's device)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(
        weight.detach().contiguous(),
        blocksize=spec.blocksize,
        compress_statistics=spec.double_quant,
        quant_type="nf4",
    )
    return bnb.nn.Params4bit(
        data=packed,
        requires_grad=False,
        quant_state=state,
        blocksize=spec.blocksize,
        compress_statistics=spec.double_quant,
        quant_type="nf4",
        bnb_quantized=True,
    )


def nf4_linear(linear: nn.Linear, compute_dtype: torch.dtype, spec: QuantSpec = QuantSpec()) -> nn.Module:
    """A bitsandbytes `Linear4bit` holding `linear`'s weight in NF4 (and its bias, dense)."""
    import bitsandbytes as bnb

    out = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=spec.double_quant,
        quant_type="nf4",
        device=linear.weight.device,
    )
    out.weight = nf4_params(linear.weight.data.float(), spec)
    # bitsandbytes' CPU inference fast path (AVX512-BF16) repacks the weight and computes
    # in lower precision; keep dequantize-then-matmul, the NF4 semantics the runner uses.
    out.support_avx512bf16_for_cpu = False
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
    return out


def dequantize_nf4(params) -> torch.Tensor:
    """[out, in] float32 weight as a `Params4bit` dequantizes."""
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(params.data, params.quant_state).float()


def quantize_hf_decoder_(model: nn.Module, compute_dtype: torch.dtype, spec: QuantSpec = QuantSpec()) -> nn.Module:
    """Replaces every nn.Linear inside the decoder layers of a Hugging Face causal LM with
    an NF4 `Linear4bit` (embeddings and lm_head stay dense, as in the runner). In place;
    marks the model `is_loaded_in_4bit` so PEFT dispatches its 4-bit adapter layers."""
    layers = model.get_decoder().layers
    for layer in layers:
        for parent in list(layer.modules()):
            for child_name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, child_name, nf4_linear(child, compute_dtype, spec))
    model.is_loaded_in_4bit = True
    return model
