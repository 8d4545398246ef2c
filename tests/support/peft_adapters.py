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


def nf4_base(quantize: bool = True):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32).eval()
    return quantize_hf_decoder_(model, torch.float32) if quantize else model


def peft_config(kind: str):
    from peft import AdaLoraConfig, LoraConfig, VeraConfig

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
    raise ValueError(kind)


def make_peft_model(kind: str, seed: int = 0, base=None, strength: float = 1.0):
    """A PEFT model with random, non-zero adapter weights of `kind` on the NF4 base;
    `strength` scales LoRA's B (larger: greedy outputs differ from the base sooner)."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(base if base is not None else nf4_base(), peft_config(kind))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if kind == "vera" and ("vera_lambda" in name):
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
