"""The one adapter form (DESIGN.md, "One adapter form").

Every adapter type is converted at load time into per-module low-rank factors, so the
kernels and the pool know one thing:  y = g ⊙ (W x + s · B (A x)).
This module knows nothing about PEFT's file layout or about the GPU pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol

import torch

# The linear layers of a Llama-family decoder that adapters may target.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

ModuleKey = tuple[int, str]  # (decoder layer index, module name in TARGET_MODULES)


@dataclass(frozen=True)
class ModuleDelta:
    """One target module's delta."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float  # s
    g: torch.Tensor | None = None  # [out], DoRA's m / ‖W + s·B·A‖ per output row; None = 1

    def __post_init__(self) -> None:
        if self.a.dim() != 2 or self.b.dim() != 2 or self.a.shape[0] != self.b.shape[1]:
            raise ValueError(f"A {tuple(self.a.shape)} and B {tuple(self.b.shape)} are not [r, in] and [out, r]")
        if self.g is not None and self.g.shape != (self.b.shape[0],):
            raise ValueError(f"g {tuple(self.g.shape)} does not match out={self.b.shape[0]}")

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def nbytes(self) -> int:
        extra = self.g.numel() * self.g.element_size() if self.g is not None else 0
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size() + extra


@dataclass(frozen=True)
class AdapterWeights:
    """A whole adapter in the one form, on the host."""

    adapter_type: str  # "lora" | "dora" | "vera" | "adalora"
    modules: Mapping[ModuleKey, ModuleDelta]
    config: Mapping = field(default_factory=dict)  # the adapter_config.json it came from

    @property
    def max_rank(self) -> int:
        return max((d.rank for d in self.modules.values()), default=0)

    @property
    def ranks(self) -> dict[str, list[int]]:
        """Rank per target module name, per layer (AdaLoRA's differ)."""
        out: dict[str, list[int]] = {}
        for (layer, name), d in sorted(self.modules.items()):
            out.setdefault(name, []).append(d.rank)
        return out

    @property
    def target_modules(self) -> list[str]:
        return sorted({name for _, name in self.modules}, key=TARGET_MODULES.index)

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for d in self.modules.values())


class BaseModelView(Protocol):
    """What conversion needs to know of the base model (implemented by the model runner)."""

    num_layers: int

    def module_shape(self, layer: int, name: str) -> tuple[int, int]:
        """(out_features, in_features) of a target module."""
        ...

    def dense_weight(self, layer: int, name: str) -> torch.Tensor:
        """The module's weight as the forward sees it ([out, in] float32; NF4 dequantized)."""
        ...
