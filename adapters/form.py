"""The one adapter form (DESIGN.md, "One adapter form").

Every adapter type is converted at load time into per-module low-rank factors, so the
kernels and the pool know one thing:

    y = g ⊙ (W x + s · o ⊙ (B (d ⊙ (A x))))

with g (DoRA's magnitude scale), o and d (VeRA's λ_b and λ_d) all 1 where a type has
none. A and B may be shared by several adapters (VeRA's frozen projections): deltas
with the same `shared_key` have the same A and B, and the pool stores them once.
This module knows nothing about PEFT's file layout or about the GPU pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Mapping, Protocol

import torch

# The linear layers of a Llama-family decoder that adapters may target.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

ModuleKey = tuple[int, str]  # (decoder layer index, module name in TARGET_MODULES)

# The largest adapter rank a server accepts unless told otherwise (serve --max-rank): the
# engine's default, and what the trainer warns against.
DEFAULT_MAX_RANK = 64


@dataclass(frozen=True)
class ModuleDelta:
    """One target module's delta."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float  # s
    g: torch.Tensor | None = None  # [out], DoRA's m / ‖W + s·B·A‖ per output row; None = 1
    rank_scale: torch.Tensor | None = None  # [r], d: scales A x per rank row (VeRA's λ_d); None = 1
    out_scale: torch.Tensor | None = None  # [out], o: scales the delta per output row (VeRA's λ_b); None = 1
    shared_key: Hashable | None = None  # equal keys: equal a and b (stored once); None = this delta's own

    def __post_init__(self) -> None:
        if self.a.dim() != 2 or self.b.dim() != 2 or self.a.shape[0] != self.b.shape[1]:
            raise ValueError(f"A {tuple(self.a.shape)} and B {tuple(self.b.shape)} are not [r, in] and [out, r]")
        for name, v, n in (("g", self.g, self.b.shape[0]), ("out_scale", self.out_scale, self.b.shape[0]), ("rank_scale", self.rank_scale, self.a.shape[0])):
            if v is not None and v.shape != (n,):
                raise ValueError(f"{name} {tuple(v.shape)} does not match {n}")

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def nbytes(self) -> int:
        """Host bytes of this delta (shared factors counted in full: the host holds views or copies)."""
        vectors = sum(v.numel() * v.element_size() for v in (self.g, self.rank_scale, self.out_scale) if v is not None)
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size() + vectors

    def folded(self) -> "ModuleDelta":
        """The same delta with d and o folded into A and B (its own factors, no shared key)."""
        a = self.a if self.rank_scale is None else (self.rank_scale.float()[:, None] * self.a.float()).to(self.a.dtype)
        b = self.b if self.out_scale is None else (self.out_scale.float()[:, None] * self.b.float()).to(self.b.dtype)
        return ModuleDelta(a, b, self.scale, self.g)

    def dense(self) -> torch.Tensor:
        """[out, in] float32: the delta as one matrix, s · diag(o) B diag(d) A (before g)."""
        a = self.a.float() if self.rank_scale is None else self.rank_scale.float()[:, None] * self.a.float()
        b = self.b.float() if self.out_scale is None else self.out_scale.float()[:, None] * self.b.float()
        return self.scale * (b @ a)


@dataclass(frozen=True)
class AdapterWeights:
    """A whole adapter in the one form, on the host."""

    adapter_type: str  # "lora" | "dora" | "vera" | "adalora" | "loha" | "lokr"
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
