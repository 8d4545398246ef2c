"""What the trainer's variants change around its loop: the base layers, the saving, the noise.

    dense_nf4_decoder_(model)        LoHa, LoKr, PiSSA, OLoRA: NF4 linears -> float linears
                                     holding their dequantized weights
    AdapterSaver(model, convert)     PEFT's save_pretrained; PiSSA/OLoRA saved converted
    neftune(model, alpha)            NEFTune noise on the input embeddings, training mode only

Why a dense base. The trainer trains on the NF4 base the server serves. PEFT 0.21 cannot put
LoHa or LoKr on bitsandbytes' 4-bit layers: its LyCORIS layers size their factors from the
weight's packed storage ([out·in/2, 1] uint8), so the forward fails. PiSSA refuses a 4-bit
weight ("initialize PiSSA under float32, float16, or bfloat16"), and OLoRA on one re-quantizes
its residual W - s·B0·A0 to NF4, so the model it trains is Q(W - s·B0·A0) + s·B·A, which the
converted adapter on the server's Q(W) does not reproduce. So these types train on
`dense_nf4_decoder_`'s nn.Linear layers whose weight is dequantize(Q(W)) — bit for bit the
matrix the served NF4 forward multiplies by (cast to the compute dtype, as bitsandbytes'
4-bit matmul casts it) — and PiSSA/OLoRA's residual is then exactly dequantize(Q(W)) - s·B0·A0
in float. The trained model equals the server's NF4 base plus the saved (converted) adapter
up to float rounding. The cost is memory: the decoder's linears are held in the compute
dtype (bf16 on CUDA: 4x the NF4 bytes), not in 4 bits, for these types only.

Converted saving. PiSSA and OLoRA move the principal part of W into the adapter at init,
so their adapter alone is wrong on the unmodified base (the server refuses one). PEFT's
`save_pretrained(path_initial_model_for_weight_conversion=INIT)` writes instead the plain
LoRA ΔW = s·(B·A - B0·A0) = s·[B | -B0]·[A ; A0] (rank 2r, alpha doubled, or ×√2 with
rsLoRA, init_lora_weights true), given the initial adapter saved to INIT before any step.
INIT lives in a temporary directory, removed by `close()`: the initial factors on their own
would look like a plain LoRA and serve a wrong model.

This module knows nothing of the data, the loop or the server.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from loraplex.server.model.quantize import dequantize_nf4


def dense_nf4_decoder_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replaces every bitsandbytes 4-bit linear inside the decoder layers (as
    `quantize_hf_decoder_` made them) with an nn.Linear holding its dequantized weight in
    `dtype` (bias kept), frozen. In place; clears `is_loaded_in_4bit`, so PEFT dispatches
    its plain layers."""
    import bitsandbytes as bnb

    for layer in model.get_decoder().layers:
        for parent in list(layer.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, bnb.nn.Linear4bit):
                    weight = dequantize_nf4(child.weight).to(dtype)  # [out, in]
                    dense = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                      device=weight.device, dtype=dtype)
                    dense.weight = nn.Parameter(weight, requires_grad=False)
                    if child.bias is not None:
                        dense.bias = nn.Parameter(child.bias.data.to(dtype), requires_grad=False)
                    setattr(parent, child_name, dense)
    model.is_loaded_in_4bit = False
    return model


class AdapterSaver:
    """`save(model, out)` writes the PeftModel's adapter in PEFT's format (safetensors, no
    embeddings). With `convert` (PiSSA, OLoRA) it saves the initial adapter now — call it
    before the first optimizer step — and every later save converted to plain LoRA."""

    def __init__(self, model, convert: bool):
        self._tmp = None
        self.initial_dir: Path | None = None
        if convert:
            self._tmp = tempfile.mkdtemp(prefix="loraplex-train-init-")
            self.initial_dir = Path(self._tmp) / "initial"
            model.save_pretrained(str(self.initial_dir), safe_serialization=True, save_embedding_layers=False)

    def save(self, model, out: str | Path) -> None:
        extra = {}
        if self.initial_dir is not None:
            extra["path_initial_model_for_weight_conversion"] = str(self.initial_dir)
        model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False, **extra)

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = self.initial_dir = None


def neftune_noise(embeddings: torch.Tensor, alpha: float) -> torch.Tensor:
    """NEFTune (Jain et al. 2023): embeddings [B, L, d] + U(-m, m), m = alpha / sqrt(L·d),
    as transformers' `neftune_post_forward_hook` (L the padded length)."""
    m = alpha / (embeddings.shape[1] * embeddings.shape[2]) ** 0.5
    return embeddings + torch.empty_like(embeddings).uniform_(-m, m)


@contextmanager
def neftune(model, alpha: float):
    """While open, the model's input embeddings get NEFTune noise in training mode (never in
    eval mode, so evaluation, saving and the saved adapter are untouched); alpha 0 = off."""
    if alpha <= 0:
        yield
        return
    embed = model.get_input_embeddings()

    def hook(module, args, output):
        return neftune_noise(output, alpha) if module.training else output

    handle = embed.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
