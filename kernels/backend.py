"""Chooses the adapter-op implementation once per device: Triton on CUDA, the torch
reference elsewhere. Tests pick one explicitly with `lora_ops(backend=...)`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class LoraOps:
    name: str
    shrink: Callable
    expand: Callable


def lora_ops(device: torch.device | str, backend: str = "auto") -> LoraOps:
    """backend: "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton"."""
    device = torch.device(device)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "torch":
        from loraplex.kernels.expand import expand_ref
        from loraplex.kernels.shrink import shrink_ref

        return LoraOps("torch", shrink_ref, expand_ref)
    if backend == "triton":
        from loraplex.kernels.expand import expand
        from loraplex.kernels.shrink import shrink

        return LoraOps("triton", shrink, expand)
    raise ValueError(f"unknown adapter-op backend {backend!r} (auto, torch, triton)")
