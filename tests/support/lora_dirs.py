"""PEFT-format LoRA directories with random, non-zero weights for the bundled tiny model,
written by hand (no PEFT needed): for server and hardening tests that need many cheap adapters."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import loraplex

TINY = Path(loraplex.__file__).parent / "assets" / "tiny-llama"
ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def module_shapes() -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each target module of the tiny model."""
    c = json.loads((TINY / "config.json").read_text())
    h, inter = c["hidden_size"], c["intermediate_size"]
    head_dim = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}  # fmt: skip


def lora_tensors(rank: int, targets=ALL_MODULES, seed: int = 0) -> dict[str, torch.Tensor]:
    """PEFT-named LoRA weights for every layer of the tiny model, non-zero and random."""
    layers = json.loads((TINY / "config.json").read_text())["num_hidden_layers"]
    shapes = module_shapes()
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for name in targets:
            parent = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            fan_in, fan_out = shapes[name]
            prefix = f"base_model.model.model.layers.{i}.{parent}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.5
    return tensors


def lora_config(rank: int, targets=ALL_MODULES) -> bytes:
    return json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
                       "target_modules": list(targets), "bias": "none", "lora_dropout": 0.0,
                       "base_model_name_or_path": "tiny-llama"}).encode()  # fmt: skip


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def raw_safetensors(header, data: bytes, declared: int | None = None) -> bytes:
    """A safetensors file written by hand: 8-byte length (or `declared`), header, data."""
    h = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    return (len(h) if declared is None else declared).to_bytes(8, "little") + h + data


def layout(tensors: dict[str, torch.Tensor]) -> tuple[dict, bytes]:
    """The header entries and data section safetensors would write for `tensors` (F32)."""
    header, chunks, offset = {}, [], 0
    for name, t in tensors.items():
        b = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        chunks.append(b)
        offset += len(b)
    return header, b"".join(chunks)


def write_adapter(out: Path, config: bytes, weights: bytes) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_bytes(config)
    (out / "adapter_model.safetensors").write_bytes(weights)
    return out


def write_lora(out: Path, rank: int = 4, targets=ALL_MODULES, seed: int = 0) -> Path:
    return write_adapter(out, lora_config(rank, targets), safetensors_bytes(lora_tensors(rank, targets, seed)))
