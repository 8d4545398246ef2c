"""PEFT LoRA adapters for the load benchmark (bench/load.py), made on the server's model.

    dirs = make_lora_adapters(out_dir, count=8, rank=8, seed=0)   # [out_dir/lora-0, ...]

Each adapter is what a user would bring: `LoraConfig(init_lora_weights=False)` on the
Hugging Face model, saved with `save_pretrained` (adapter_config.json +
adapter_model.safetensors). With init_lora_weights=False both A and B keep nn.Linear's
random init, so every adapter changes the model's output and no two are alike.
The benchmark keeps its own generator: bench/ never imports from tests/.
"""

from __future__ import annotations

from pathlib import Path

import torch

import loraplex

TINY = Path(loraplex.__file__).parent / "assets" / "tiny-llama"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_lora_adapters(
    out_dir: Path, count: int, rank: int = 8, seed: int = 0, model_dir: Path = TINY, prefix: str = "lora"
) -> list[Path]:
    """Writes `count` PEFT LoRA directories `out_dir/<prefix>-<i>` (seeds seed, seed+1, ...)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        torch.manual_seed(seed + i)
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
        model = get_peft_model(base, config)
        path = out_dir / f"{prefix}-{i}"
        model.save_pretrained(str(path), safe_serialization=True)
        paths.append(path)
    return paths
