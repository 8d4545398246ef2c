"""The ops the model's forward runs, chosen once per device: the Triton kernels on CUDA,
their torch references on the CPU. Tests pick a backend explicitly (`model_ops(device,
lora="triton", kernels="triton")` runs the CUDA configuration in Triton's interpreter).

    lora        shrink / expand (kernels/shrink.py, kernels/expand.py)
    attention   paged attention over the step context (server/model/attention.py)
    rope_kv     RoPE fused with the KV-cache write (kernels/rope_kv.py)
    rms_norm    RMSNorm, optionally fused with the residual add (kernels/rms_norm.py)
    silu_mul    SiLU(gate) * up (kernels/silu_mul.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from loraplex.kernels.backend import LoraOps, lora_ops

BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class ModelOps:
    name: str  # the kernels' backend: "torch" or "triton"
    lora: LoraOps
    attention: Callable  # (q [T, H, D], step, layer, scale) -> [T, H, D]
    rope_kv: Callable
    rms_norm: Callable
    silu_mul: Callable

    @property
    def host_layout(self) -> bool:
        """Does attention read the step's host-side layout (the torch backend)?"""
        return self.name == "torch"


def model_ops(device: torch.device | str, lora: str = "auto", kernels: str = "auto") -> ModelOps:
    """lora: the adapter ops' backend; kernels: attention, RoPE + KV write, RMSNorm and
    SiLU·up. "auto" = Triton on CUDA, torch elsewhere."""
    device = torch.device(device)
    if kernels not in BACKENDS:
        raise ValueError(f"unknown kernel backend {kernels!r} ({', '.join(BACKENDS)})")
    if kernels == "auto":
        kernels = "triton" if device.type == "cuda" else "torch"
    if kernels == "torch":
        from loraplex.kernels.rms_norm import rms_norm_ref
        from loraplex.kernels.rope_kv import rope_kv_write_ref
        from loraplex.kernels.silu_mul import silu_mul_ref
        from loraplex.server.model.attention import attention_torch

        return ModelOps("torch", lora_ops(device, lora), attention_torch, rope_kv_write_ref, rms_norm_ref, silu_mul_ref)
    from loraplex.kernels.rms_norm import rms_norm
    from loraplex.kernels.rope_kv import rope_kv_write
    from loraplex.kernels.silu_mul import silu_mul
    from loraplex.server.model.attention import attention_triton

    return ModelOps("triton", lora_ops(device, lora), attention_triton, rope_kv_write, rms_norm, silu_mul)
