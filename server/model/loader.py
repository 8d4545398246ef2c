"""Loads a Hugging Face model directory (config.json, *.safetensors) into `LlamaModel`,
quantizing every decoder linear to NF4 at load, or reading weights already saved in
bitsandbytes 4-bit form. Never unpickles: only safetensors weights are read."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.server.model.adapter_linear import AdapterLinear
from loraplex.server.model.config import ModelConfig
from loraplex.server.model.linear import DenseLinear, nf4_group
from loraplex.server.model.llama import GROUPS, DecoderLayer, LlamaModel, RMSNorm
from loraplex.server.model.quantize import QuantSpec, dequantize_nf4, nf4_params

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_BNB_STATE_SUFFIX = ".quant_state.bitsandbytes__nf4"


@dataclass(frozen=True)
class LoadSpec:
    quant: QuantSpec = QuantSpec()
    dtype: torch.dtype = torch.float32  # compute dtype: float32 on CPU, bfloat16 on CUDA
    device: str = "cpu"
    nf4_backend: str = "bnb"  # "bnb", "auto" (Triton where it wins) or "triton" (see NF4Linear)


class _Weights:
    """All safetensors tensors of a model directory, read lazily."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            bins = sorted(model_dir.glob("*.bin")) + sorted(model_dir.glob("*.pt"))
            hint = " (pickle weights are refused: convert them to safetensors)" if bins else ""
            raise FileNotFoundError(f"no .safetensors weights in {model_dir}{hint}")
        self._handles = {}
        self._where: dict[str, object] = {}
        for f in files:
            h = safe_open(str(f), framework="pt")
            self._handles[f] = h
            for key in h.keys():
                self._where[key] = h

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise KeyError(f"weight {key!r} missing from the model directory")
        return self._where[key].get_tensor(key)

    def with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k: self.get(k) for k in self._where if k.startswith(prefix)}


def _slice(w: _Weights, prefix: str, spec: LoadSpec):
    """The weight of `prefix` (e.g. model.layers.0.self_attn.q_proj) on spec.device, and its
    bias: a bitsandbytes NF4 `Params4bit` when spec.quant.mode is "nf4" (quantized here, or
    read as saved in bitsandbytes 4-bit form), else a dense [out, in] tensor."""
    key = prefix + ".weight"
    bias = w.get(prefix + ".bias").to(spec.dtype) if prefix + ".bias" in w else None
    if key + _BNB_STATE_SUFFIX in w:  # saved in bitsandbytes 4-bit form
        import bitsandbytes as bnb

        stats = {k[len(key) + 1 :]: v for k, v in w.with_prefix(key + ".").items()}
        params = bnb.nn.Params4bit.from_prequantized(w.get(key), stats, requires_grad=False, device=spec.device)
        return (params if spec.quant.mode == "nf4" else dequantize_nf4(params)), bias
    weight = w.get(key).to(spec.device)
    return (nf4_params(weight.float(), spec.quant) if spec.quant.mode == "nf4" else weight), bias


def _linear(w: _Weights, prefixes: list[str], spec: LoadSpec):
    """The base of one group of slices (server/model/linear.py: one matmul for the group)
    and the slices' biases ([out_i] or None)."""
    parts, biases = zip(*(_slice(w, prefix, spec) for prefix in prefixes))
    if spec.quant.mode == "nf4":
        return nf4_group(parts, spec.dtype, spec.nf4_backend), list(biases)
    return DenseLinear.stack(parts, spec.dtype), list(biases)


def load_model(model_dir: Path | str, spec: LoadSpec = LoadSpec()) -> LlamaModel:
    model_dir = Path(model_dir)
    config = ModelConfig.from_pretrained(model_dir)
    w = _Weights(model_dir)
    device = torch.device(spec.device)

    def dense(key: str) -> torch.Tensor:
        return w.get(key).to(device=device, dtype=spec.dtype)

    layers = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}"
        groups = {}
        for names in GROUPS:
            prefixes = [f"{p}.{'self_attn' if name in _ATTN else 'mlp'}.{name}" for name in names]
            base, biases = _linear(w, prefixes, spec)
            in_features = config.module_shape(names[0])[1]
            groups[names[0]] = AdapterLinear(names, base.to(device), biases, in_features, spec.dtype, device)
        norms = (
            RMSNorm(dense(f"{p}.input_layernorm.weight"), config.rms_norm_eps),
            RMSNorm(dense(f"{p}.post_attention_layernorm.weight"), config.rms_norm_eps),
        )
        layers.append(DecoderLayer(config, groups, norms, i))
    embed = dense("model.embed_tokens.weight")
    lm_head = embed if config.tie_word_embeddings or "lm_head.weight" not in w else dense("lm_head.weight")
    norm = RMSNorm(dense("model.norm.weight"), config.rms_norm_eps)
    return LlamaModel(config, embed, layers, norm, lm_head, spec.dtype, device)


def is_prequantized(model_dir: Path | str) -> bool:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return cfg.get("quantization_config", {}).get("load_in_4bit", False)
