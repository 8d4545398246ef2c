"""The model's shape, read from a Hugging Face config (Llama, Mistral, Qwen2)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position: int
    qkv_bias: bool  # Qwen2 and Llama's attention_bias
    mlp_bias: bool
    tie_word_embeddings: bool
    sliding_window: int | None  # Mistral/Qwen2; None = full attention
    eos_token_ids: tuple[int, ...]
    hf_config: object  # the transformers config, for RoPE variants

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} heads are not a multiple of {self.num_kv_heads} KV heads")

    @classmethod
    def from_pretrained(cls, model_dir: Path | str) -> "ModelConfig":
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        if hf.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model type {hf.model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        eos = hf.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        window = getattr(hf, "sliding_window", None)
        if hf.model_type == "qwen2" and not getattr(hf, "use_sliding_window", False):
            window = None
        return cls(
            model_type=hf.model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_position=hf.max_position_embeddings,
            qkv_bias=hf.model_type == "qwen2" or bool(getattr(hf, "attention_bias", False)),
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            sliding_window=window,
            eos_token_ids=eos_ids,
            hf_config=hf,
        )

    def module_shape(self, name: str) -> tuple[int, int]:
        """(out_features, in_features) of a target module."""
        h, q, kv, i = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.intermediate_size
        return {
            "q_proj": (q, h),
            "k_proj": (kv, h),
            "v_proj": (kv, h),
            "o_proj": (h, q),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
        }[name]

    def rope_inv_freq(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
        """RoPE inverse frequencies [head_dim / 2] and attention scaling, through
        transformers' ROPE_INIT_FUNCTIONS so Llama-3/YaRN/linear scaling are right."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        hf = self.hf_config
        params = getattr(hf, "rope_parameters", None) or {}
        legacy = getattr(hf, "rope_scaling", None) or {}
        rope_type = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
        if rope_type == "default":
            theta = params.get("rope_theta") or getattr(hf, "rope_theta", 10000.0)
            inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim))
            return inv_freq, 1.0
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, device)
        return inv_freq.float(), float(scaling)
