"""NF4 quantization of linear weights with bitsandbytes, shared by the model runner,
the trainer and the PEFT oracle, so every side of a comparison holds the same 4-bit
values (blocksize 64, double quantization of absmax on by default)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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


def absmax_fp32(quant_state) -> torch.Tensor:
    """[blocks] float32 absmax of a 4-bit QuantState, exactly as `dequantize_4bit` computes it
    before scaling the codes: with double quantization, the 8-bit codes dequantized by
    `dequantize_blockwise` and the offset added back (the same calls, in the same order)."""
    import bitsandbytes.functional as bnbf

    if not quant_state.nested:
        return quant_state.absmax.float()
    absmax = bnbf.dequantize_blockwise(quant_state.absmax, quant_state.state2)
    absmax += quant_state.offset
    return absmax.float()


def can_stack_nf4(in_features: int, blocksize: int = NF4_BLOCKSIZE) -> bool:
    """Whether NF4 weights of `in_features` columns stack along out with `stack_nf4`:
    a quant block (blocksize consecutive elements of the row-major weight) then never
    crosses a row, so each slice's codes and absmax are whole rows of the stack."""
    return in_features % blocksize == 0


def stack_nf4(parts: Sequence):
    """One `Params4bit` of [sum out_i, in] from NF4 `Params4bit`s of [out_i, in] (same in,
    blocksize, code and dtype; `can_stack_nf4(in)`), each quantized on its own as PEFT's
    Linear4bit does. Its dequantization is the slices' stacked, bit for bit.

    The 4-bit codes concatenate as they are. A double-quantized absmax does not: its 8-bit
    codes are scaled per 256 blocks (groups that straddle slices unless every slice has a
    multiple of 256 blocks) and offset by the mean absmax of its own slice. Even where the
    groups line up, each slice keeps its own offset, and both bitsandbytes' matmul_4bit
    and kernels/nf4_matmul.py read one offset per weight; the 8-bit codes cannot absorb the
    difference exactly. So the stack keeps absmax in float32 (`absmax_fp32`: the values
    dequantize_4bit scales by), not nested: 4 + 32/64 = 4.5 bits per weight instead of
    4 + 8/64 + 32/(64*256) = 4.127, ~9% more bytes for the stacked groups (q|k|v, gate|up;
    Llama-3-8B: +203 MiB, 3.35 -> 3.55 GiB of NF4 base weights). Single-slice groups (o,
    down) are not stacked and keep their 8-bit absmax."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    states = [p.quant_state for p in parts]
    first = states[0]
    in_features = int(first.shape[1])
    for s in states:
        if s.quant_type != "nf4" or s.blocksize != first.blocksize or s.dtype != first.dtype:
            raise ValueError("stacked NF4 slices need the same quant type, blocksize and dtype")
        if int(s.shape[1]) != in_features or not torch.equal(s.code, first.code):
            raise ValueError("stacked NF4 slices need the same in_features and code")
    if not can_stack_nf4(in_features, first.blocksize):
        raise ValueError(f"in_features={in_features} is not a multiple of the quant block {first.blocksize}")
    data = torch.cat([p.data.reshape(-1) for p in parts]).reshape(-1, 1)  # [sum out * in / 2, 1] uint8
    absmax = torch.cat([absmax_fp32(s) for s in states])  # [sum out * in / 64] float32
    out = sum(int(s.shape[0]) for s in states)
    state = bnbf.QuantState(absmax=absmax, shape=torch.Size((out, in_features)), code=first.code,
                            blocksize=first.blocksize, quant_type="nf4", dtype=first.dtype)
    return bnb.nn.Params4bit(data=data, requires_grad=False, quant_state=state, blocksize=first.blocksize,
                             compress_statistics=False, quant_type="nf4", bnb_quantized=True)


def slice_nf4(params, row0: int, rows: int):
    """(packed data, QuantState) of rows [row0, row0 + rows) of a non-nested NF4 weight whose
    in_features is a multiple of its blocksize (a `stack_nf4` result): views, no copy."""
    import bitsandbytes.functional as bnbf

    s = params.quant_state
    if s.nested:
        raise ValueError("rows of a double-quantized weight share absmax scales; slice only stacks")
    k = int(s.shape[1])
    data = params.data.reshape(-1)[row0 * k // 2 : (row0 + rows) * k // 2].reshape(-1, 1)
    absmax = s.absmax[row0 * k // s.blocksize : (row0 + rows) * k // s.blocksize]
    return data, bnbf.QuantState(absmax=absmax, shape=torch.Size((rows, k)), code=s.code, blocksize=s.blocksize,
                                 quant_type="nf4", dtype=s.dtype)


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
