"""One small interface for adapter types, and the registry keyed by PEFT type.

An adapter type says which tensors a PEFT file of its kind holds (`tensor_names`) and
converts them, with the parsed config and a view of the base model, into the one form
(`convert`, DESIGN.md "One adapter form"). The loader does everything common (files,
key names, target sets, rank limits); a type only knows its own tensors and arithmetic.
Nothing outside the types dispatches on the type: callers look it up here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import MappingProxyType
from typing import Hashable, Mapping, Protocol

import torch

from .config import AdapterConfig
from .errors import AdapterError
from .form import AdapterWeights, BaseModelView, ModuleDelta, ModuleKey
from .numerics import check_delta


@dataclass(frozen=True)
class TensorNames:
    """The tensors a file of one adapter type must hold, exactly (no more, no fewer)."""

    module: frozenset[str]  # per target module: key suffix after the module name, e.g. "lora_A.weight"
    shared: frozenset[str] = frozenset()  # after "base_model.", e.g. "vera_A"
    optional: frozenset[str] = frozenset()  # per module, allowed but not required: the type's convert checks
    # them (LoKr: which factors are full depends on the base's shapes; LoHa: CP tensors, refused by name)


@dataclass(frozen=True)
class AdapterTensors:
    """A file's tensors grouped by target module (as stored: any float dtype, CPU)."""

    modules: Mapping[ModuleKey, Mapping[str, torch.Tensor]]  # (layer, name) -> {suffix: tensor}
    shared: Mapping[str, torch.Tensor]  # name -> tensor


class AdapterType(Protocol):
    peft_type: str  # adapter_config.json "peft_type", e.g. "LORA"

    def tensor_names(self, config: AdapterConfig) -> TensorNames: ...

    def type_name(self, config: AdapterConfig) -> str:
        """What AdapterWeights.adapter_type will say ("lora", "dora", "vera", "adalora", "loha", "lokr")."""
        ...

    def declared_rank(self, config: AdapterConfig, key: ModuleKey, shape: tuple[int, int] | None = None) -> int:
        """The module's rank as the config declares it, before any weight is read (an upper
        bound where conversion prunes rows: AdaLoRA's zero singular values). shape: the base
        module's (out, in) where the caller knows it (LoKr's rank depends on it)."""
        ...

    def convert(
        self, config: AdapterConfig, tensors: AdapterTensors, base: BaseModelView, dtype: torch.dtype
    ) -> AdapterWeights:
        """The adapter in the one form, its tensors in `dtype` (arithmetic in float32)."""
        ...


@functools.cache
def adapter_types() -> Mapping[str, AdapterType]:
    """The registry: PEFT type -> AdapterType. Built on first use because the types
    import the helpers below."""
    from .adalora import ADALORA
    from .loha import LOHA
    from .lokr import LOKR
    from .lora import LORA
    from .vera import VERA

    return MappingProxyType({t.peft_type: t for t in (LORA, VERA, ADALORA, LOHA, LOKR)})


def adapter_type(peft_type: str) -> AdapterType:
    types = adapter_types()
    if peft_type not in types:
        raise AdapterError(f"peft_type {peft_type!r} is not supported (supported: {', '.join(types)})")
    return types[peft_type]


# -- helpers shared by the types ------------------------------------------------------------


def module_label(key: ModuleKey) -> str:
    return f"layer {key[0]} {key[1]}"


def expect(
    tensors: Mapping[str, torch.Tensor],
    suffix: str,
    shape: tuple[int, ...],
    key: ModuleKey,
    base: BaseModelView,
    note: str = "",
) -> torch.Tensor:
    """tensors[suffix] as float32, refused unless it has `shape`."""
    t = tensors[suffix]
    if tuple(t.shape) != tuple(shape):
        out, inn = base.module_shape(*key)
        raise AdapterError(
            f"{module_label(key)}: {suffix} has shape {tuple(t.shape)}, expected {tuple(shape)} "
            f"(base module out={out}, in={inn}{note})"
        )
    return t.float()


def delta(
    key: ModuleKey,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    g: torch.Tensor | None,
    dtype: torch.dtype,
    *,
    base: BaseModelView,
    sources: Mapping[str, str],
    rank_scale: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
    shared_key: Hashable | None = None,
) -> ModuleDelta:
    """A ModuleDelta in `dtype` (contiguous, detached), refused unless it is servable
    (numerics.py: finite where stored, on the scale of the base module `key`).
    sources: "s", "A", "B", "g", "rank_scale", "out_scale" -> the field or tensor each came
    from, for the messages (e.g. {"s": "lora_alpha=16 / r=8", "A": "lora_A.weight"})."""
    optional = {"g": g, "rank_scale": rank_scale, "out_scale": out_scale}
    parts = {"A": a, "B": b} | {n: t for n, t in optional.items() if t is not None}
    cast = {n: t.detach().to(dtype).contiguous() for n, t in parts.items()}  # d too: finite in dtype, so in float32
    check_delta(module_label(key), cast, float(scale), dtype, base, key, sources)
    return ModuleDelta(a=cast["A"], b=cast["B"], scale=float(scale), g=cast.get("g"), rank_scale=cast.get("rank_scale"),
                       out_scale=cast.get("out_scale"), shared_key=shared_key)  # fmt: skip
