"""Reads a PEFT adapter directory into the one form, refusing everything else.

A directory holds adapter_config.json and adapter_model.safetensors, as PEFT's
`save_pretrained` writes them. `load_adapter_dir` refuses (AdapterError, naming the
problem): pickle weights (adapter_model.bin/.pt/...: refused without being opened),
a missing or symlinked file, a config the server does not serve (config.py), any tensor
key it does not understand (biases, modules_to_save, embeddings), tensors for layers or
modules the base does not have or the config does not target, targeted modules without
weights, a module missing one of its tensors, shapes that do not match the base,
non-float dtypes and NaN/Inf (safetensors_io.py), ranks over max_rank, and an adapter
that ends with no module (it would silently serve the base model).

Key names (PEFT 0.21, adapter name stripped at save):
    base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.{suffix}   per module
    base_model.{name}                                                      shared (VeRA)
where the adapter type says which suffixes and shared names exist (registry.py).
It knows nothing of the GPU pool or of where directories live (store.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
import re
from pathlib import Path

import torch

from .config import MODULE_PARENT, AdapterConfig, decode_config_json, parse_adapter_config
from .errors import AdapterError, AdapterNotFound
from .files import open_regular_file
from .form import TARGET_MODULES, AdapterWeights, BaseModelView, ModuleKey
from .registry import AdapterTensors, TensorNames, adapter_type, module_label
from .safetensors_io import read_safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)
# Pickle formats PEFT/torch write adapter weights in: refused, never opened.
PICKLE_WEIGHTS = tuple(f"adapter_model.{ext}" for ext in ("bin", "pt", "pth", "ckpt", "pkl", "pickle"))
MAX_CONFIG_BYTES = 1 << 20

# A layer index of at most 9 digits: int() of thousands would raise (and no base has that many layers).
_MODULE_KEY = re.compile(r"^base_model\.model\.model\.layers\.(0|[1-9][0-9]{0,8})\.(\w+)\.(\w+)\.(.+)$")
_SHARED_KEY = re.compile(r"^base_model\.(\w+)$")


def _read_config(path: Path) -> bytes:
    with open_regular_file(path, follow_symlinks=False, max_bytes=MAX_CONFIG_BYTES,
                           missing=f"{CONFIG_NAME} is missing from the adapter directory") as (f, _):
        return f.read(MAX_CONFIG_BYTES + 1)[:MAX_CONFIG_BYTES]


def read_config(directory: str | os.PathLike, *, max_rank: int | None = None) -> AdapterConfig:
    """The validated adapter_config.json of a directory (no weights read)."""
    return parse_adapter_config(decode_config_json(_read_config(Path(directory) / CONFIG_NAME)), max_rank=max_rank)


def group_tensors(
    tensors: dict[str, torch.Tensor], names: TensorNames, peft_type: str, num_layers: int
) -> AdapterTensors:
    """Maps PEFT keys to (layer, module) -> {suffix: tensor} and shared name -> tensor."""
    modules: dict[ModuleKey, dict[str, torch.Tensor]] = {}
    shared: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = _MODULE_KEY.match(key)
        s = _SHARED_KEY.match(key)
        if m is not None:
            layer, parent, name, suffix = int(m.group(1)), m.group(2), m.group(3), m.group(4)
            if name not in TARGET_MODULES or MODULE_PARENT[name] != parent:
                raise AdapterError(
                    f"tensor {key!r} is for module {parent}.{name}, which is not one of the target modules "
                    f"({', '.join(f'{MODULE_PARENT[n]}.{n}' for n in TARGET_MODULES)})"
                )
            if layer >= num_layers:
                raise AdapterError(f"tensor {key!r} is for layer {layer}, but the base model has {num_layers} layers")
            if suffix not in names.module | names.optional:
                raise AdapterError(
                    f"tensor {key!r}: {suffix!r} is not a {peft_type} weight loraplex understands "
                    f"(a module holds {', '.join(sorted(names.module | names.optional))})"
                )
            modules.setdefault((layer, name), {})[suffix] = t
        elif s is not None and s.group(1) in names.shared:
            shared[s.group(1)] = t
        else:
            raise AdapterError(
                f"tensor {key!r} is not a {peft_type} adapter weight loraplex understands "
                "(biases, modules_to_save and embedding weights are not served)"
            )
    for key, ts in sorted(modules.items()):
        missing = sorted(names.module - ts.keys())
        if missing:
            raise AdapterError(f"{module_label(key)}: {', '.join(missing)} is missing (a {peft_type} module needs "
                               f"{', '.join(sorted(names.module))})")  # fmt: skip
    missing_shared = sorted(names.shared - shared.keys())
    if missing_shared:
        raise AdapterError(f"tensor base_model.{missing_shared[0]} is missing")
    return AdapterTensors(modules=modules, shared=shared)


def check_targets(config: AdapterConfig, tensors: AdapterTensors, num_layers: int) -> None:
    """The file's modules must be exactly those the config targets on this base."""
    targeted = set(config.targeted_modules(num_layers))
    present = set(tensors.modules)
    extra, missing = sorted(present - targeted), sorted(targeted - present)
    if extra:
        raise AdapterError(f"{module_label(extra[0])} has weights, but adapter_config.json target_modules does not target it")
    if missing:
        raise AdapterError(f"{module_label(missing[0])} is targeted by adapter_config.json, but the file has no weights for it")


def _open_dir(path: str | os.PathLike, max_rank: int) -> tuple[Path, AdapterConfig]:
    """The directory and its validated config, after the checks that read no weights."""
    if max_rank < 1:
        raise ValueError(f"max_rank must be positive, not {max_rank}")
    directory = Path(path)
    if not directory.is_dir():
        raise AdapterNotFound(f"adapter directory {directory.name!r} does not exist")
    for name in PICKLE_WEIGHTS:
        if os.path.lexists(directory / name):
            raise AdapterError(
                f"{name} is a pickle file, which loraplex never opens; save the adapter as "
                f"{WEIGHTS_NAME} (PEFT save_pretrained with safe_serialization=True)"
            )
    config = read_config(directory, max_rank=max_rank)
    if not os.path.lexists(directory / WEIGHTS_NAME):
        raise AdapterError(f"{WEIGHTS_NAME} is missing from the adapter directory")
    return directory, config


@dataclass(frozen=True)
class AdapterSummary:
    """What a directory declares, read without its weights (`summarize_adapter_dir`)."""

    adapter_type: str  # lora | dora | vera | adalora | loha | lokr
    ranks: dict[str, list[int]]  # module name -> declared rank per adapted layer
    target_modules: list[str]
    file_bytes: int  # of adapter_model.safetensors


def summarize_adapter_dir(path: str | os.PathLike, num_layers: int, *, max_rank: int, max_bytes: int | None = None,
                          base: BaseModelView | None = None) -> AdapterSummary:
    """The checks `load_adapter_dir` makes without reading the weights (pickle files, the
    config, target patterns against a `num_layers` base, the weights file's presence and
    size), and what the config declares. Cheap: for registering many adapters at once;
    the weights are validated when first loaded. base: its module shapes make the declared
    ranks of shape-dependent types exact (LoKr; without it, the config's r: lokr.py)."""
    directory, config = _open_dir(path, max_rank)
    weights = directory / WEIGHTS_NAME
    if weights.is_symlink() or not weights.is_file():
        raise AdapterError(f"{WEIGHTS_NAME} is not a regular file")
    size = weights.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise AdapterError(f"{WEIGHTS_NAME} is {size} bytes, over the limit of {max_bytes}")
    kind = adapter_type(config.peft_type)
    targets = config.targeted_modules(num_layers)
    if not targets:
        raise AdapterError("the adapter has no target modules: serving it would serve the base model")
    ranks: dict[str, list[int]] = {}
    for key in sorted(targets):
        r = kind.declared_rank(config, key, None if base is None else base.module_shape(*key))
        if r > max_rank:
            raise AdapterError(_over_max_rank(key, r, max_rank, kind.type_name(config)))
        ranks.setdefault(key[1], []).append(r)
    names = sorted(ranks, key=TARGET_MODULES.index)
    return AdapterSummary(kind.type_name(config), ranks, names, size)


def load_adapter_dir(
    path: str | os.PathLike,
    base: BaseModelView,
    *,
    max_rank: int,
    dtype: torch.dtype,
    max_bytes: int | None = None,
) -> AdapterWeights:
    """The adapter in `path` in the one form, tensors in `dtype` on the CPU.
    max_rank: the largest rank the server serves; max_bytes: cap on the weights file."""
    directory, config = _open_dir(path, max_rank)
    kind = adapter_type(config.peft_type)
    weights_path = directory / WEIGHTS_NAME
    raw = read_safetensors(weights_path, max_bytes=max_bytes, follow_symlinks=False)
    tensors = group_tensors(raw, kind.tensor_names(config), config.peft_type, base.num_layers)
    check_targets(config, tensors, base.num_layers)
    if not tensors.modules:
        raise AdapterError("the adapter has no target modules: serving it would serve the base model")

    weights = kind.convert(config, tensors, base, dtype)

    if not weights.modules:
        raise AdapterError("the adapter has no non-zero module (e.g. every AdaLoRA singular value lora_E is 0): "
                           "serving it would serve the base model")  # fmt: skip
    for key, d in sorted(weights.modules.items()):
        out, inn = base.module_shape(*key)
        if d.a.shape[1] != inn or d.b.shape[0] != out:
            raise AdapterError(f"{module_label(key)}: converted A {tuple(d.a.shape)} and B {tuple(d.b.shape)} "
                               f"do not fit the base module (out={out}, in={inn})")  # fmt: skip
        if d.rank > max_rank:
            raise AdapterError(_over_max_rank(key, d.rank, max_rank, weights.adapter_type, weights.max_rank))
    return weights


def _over_max_rank(key: ModuleKey, rank: int, max_rank: int, type_name: str, needed: int | None = None) -> str:
    return (f"{module_label(key)} has rank {rank}, over the server's max rank {max_rank} (the rank of its {type_name} "
            f"delta as served, B·A); raise --max-rank to at least {needed or rank} to serve it")
