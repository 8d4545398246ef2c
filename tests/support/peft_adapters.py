"""Adapters made by PEFT (the reference implementation) on the bundled tiny model's NF4
base, with non-zero weights, for fidelity tests. Imported by conftest fixtures."""

from __future__ import annotations

from pathlib import Path

import torch

import loraplex
from loraplex.server.model.quantize import quantize_hf_decoder_

TINY = Path(loraplex.__file__).parent / "assets" / "tiny-llama"
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

KINDS = ("lora", "rslora", "dora", "vera", "adalora")
# LoHa and LoKr: PEFT 0.21 cannot wrap bitsandbytes' Linear4bit with them (it sizes and reshapes the
# delta by base_layer.weight.shape, the packed [n/2, 1] storage), so their PEFT models are built on
# the NF4 base dequantized (`nf4_dense_base`: the float32 W the NF4 forward multiplies by).
LYCORIS_KINDS = ("loha", "lokr", "lokr_factored")
ALL_KINDS = KINDS + LYCORIS_KINDS


def nf4_base(quantize: bool = True):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32).eval()
    return quantize_hf_decoder_(model, torch.float32) if quantize else model


def nf4_dense_base():
    """The NF4 base with each Linear4bit replaced by an nn.Linear holding its dequantized weight."""
    import bitsandbytes as bnb
    from torch import nn

    from loraplex.server.model.quantize import dequantize_nf4

    model = nf4_base()
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                dense = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                with torch.no_grad():
                    dense.weight.copy_(dequantize_nf4(child.weight))
                    if child.bias is not None:
                        dense.bias.copy_(child.bias)
                setattr(parent, child_name, dense)
    model.is_loaded_in_4bit = False
    return model.eval()


def peft_config(kind: str):
    from peft import AdaLoraConfig, LoHaConfig, LoKrConfig, LoraConfig, VeraConfig

    if kind == "lora":
        return LoraConfig(r=8, lora_alpha=16, target_modules=ALL, init_lora_weights=False)
    if kind == "rslora":
        return LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                          rank_pattern={"layers.1.self_attn.v_proj": 4}, alpha_pattern={"down_proj": 32}, init_lora_weights=False)
    if kind == "dora":
        return LoraConfig(r=8, lora_alpha=8, use_dora=True, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"], init_lora_weights=False)
    if kind == "vera":
        return VeraConfig(r=16, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"], save_projection=True, projection_prng_key=7)
    if kind == "adalora":
        return AdaLoraConfig(init_r=8, target_r=4, lora_alpha=16, total_step=10, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])
    if kind == "loha":  # rank r·r: 25, and 9 where rank_pattern sets r=3
        return LoHaConfig(r=5, alpha=10, target_modules=ALL, rank_pattern={"layers.1.self_attn.v_proj": 3},
                          alpha_pattern={"down_proj": 4})
    if kind == "lokr":  # W1 full [8, 8] (rank 8), W2 factored (r=4; o_proj r=2): rank 32 (16)
        return LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                          rank_pattern={"o_proj": 2}, alpha_pattern={"k_proj": 2})
    if kind == "lokr_factored":  # W1 factored (r=4); W2 full on q_proj [8, 8], k_proj [4, 8], else factored
        return LoKrConfig(r=4, alpha=6, decompose_both=True, decompose_factor=16,
                          target_modules=["q_proj", "k_proj", "gate_proj", "up_proj", "down_proj"])
    raise ValueError(kind)


def make_peft_model(kind: str, seed: int = 0, base=None, strength: float = 1.0):
    """A PEFT model with random, non-zero adapter weights of `kind` on the NF4 base;
    `strength` scales LoRA's B (larger: greedy outputs differ from the base sooner)."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    if base is None:
        base = nf4_dense_base() if kind in LYCORIS_KINDS else nf4_base()
    model = get_peft_model(base, peft_config(kind))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if kind == "loha" and "hada_" in name:  # PEFT's init leaves hada_w2_b at 0
                p.copy_(torch.randn_like(p) * (0.23 * strength if "hada_w1_a" in name else 0.23))
            elif kind.startswith("lokr") and "lokr_" in name:  # PEFT's init leaves W1 (or W1's a) at 0
                p.copy_(torch.randn_like(p) * ((0.05 if kind == "lokr" else 0.2) * strength if name.split(".")[-2] in ("lokr_w1", "lokr_w1_a") else 0.3))
            elif kind == "vera" and ("vera_lambda" in name):
                p.copy_(torch.randn_like(p) * 0.5 + 0.5)
            elif kind == "adalora" and "lora_E" in name:
                e = torch.randn_like(p) * 0.5
                e[torch.rand_like(e) < 0.3] = 0.0  # pruned singular values, as AdaLoRA's allocator leaves them
                p.copy_(e)
            elif kind == "adalora" and ("lora_A" in name or "lora_B" in name):
                p.copy_(torch.randn_like(p) * 0.3)
            elif kind == "dora" and "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
            elif "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05 * strength)
    return model.eval()


def save_peft_adapter(kind: str, out: Path, seed: int = 0, strength: float = 1.0):
    """Saves a PEFT adapter of `kind` into `out`; returns the in-memory PEFT model."""
    model = make_peft_model(kind, seed, strength=strength)
    model.save_pretrained(str(out), safe_serialization=True)
    return model
