"""Per-request mixtures: ΔW = Σ wᵢ ΔWᵢ as ONE adapter in the one form (DESIGN.md).

Per target module, A stacks the parts' A (each with its d folded in: VeRA's λ_d) and B
stacks wᵢ·sᵢ·(oᵢ ⊙ Bᵢ) (VeRA's λ_b folded), with scale 1, so the ranks add up:

    B·A = Σᵢ wᵢ sᵢ diag(oᵢ) Bᵢ diag(dᵢ) Aᵢ = Σᵢ wᵢ ΔWᵢ

A module that a part does not target gets nothing from it. This is PEFT's
`add_weighted_adapter(combination_type="cat")`, which puts wᵢ·sᵢ into A instead.
Every family whose delta is s·o ⊙ B(d ⊙ A x) mixes; DoRA does not (its magnitude
rescales W + ΔW row-wise: not linear in ΔW). The checks that need no tensors
(`check_parts`, `check_ranks`) are shared with the request types and the engine, which
refuse a mixture before it is queued. This module knows nothing of keys, versions or
caches (server/engine/adapter_manager.py).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch

from loraplex.adapters.errors import AdapterError
from loraplex.adapters.form import AdapterWeights, ModuleDelta, ModuleKey

MAX_MIXTURE_PARTS = 8
MIXTURE_TYPE = "mixture"
UNMIXABLE_TYPES = ("dora",)


def check_parts(parts: Sequence[tuple[str, float]]) -> None:
    """(adapter id, weight) per part: 1 to MAX_MIXTURE_PARTS parts, no id twice, finite weights."""
    if not parts:
        raise AdapterError("a mixture needs at least one adapter")
    if len(parts) > MAX_MIXTURE_PARTS:
        raise AdapterError(f"a mixture has at most {MAX_MIXTURE_PARTS} adapters, got {len(parts)}")
    seen: set[str] = set()
    for name, weight in parts:
        if name in seen:
            raise AdapterError(f"adapter {name!r} appears twice in the mixture: give each adapter once, with its total weight")
        seen.add(name)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise AdapterError(f"the weight of adapter {name!r} in the mixture must be a finite number, got {weight!r}")


def check_type(name: str, adapter_type: str) -> None:
    if adapter_type in UNMIXABLE_TYPES:
        raise AdapterError(f"adapter {name!r} is DoRA, which cannot be mixed: its magnitude rescales W + ΔW row-wise, "
                           "which is not linear in ΔW (merge it offline, or mix only LoRA-form adapters)")  # fmt: skip


def check_ranks(totals: Mapping[str, int], max_rank: int, exact: bool = True) -> None:
    """totals: module (name) -> rank of the mixture there. `exact` False: an upper bound."""
    for where, total in totals.items():
        if total > max_rank:
            bound = "" if exact else " up to"
            raise AdapterError(f"the mixture has rank{bound} {total} in {where} (the parts' ranks add up), over "
                               f"--max-rank {max_rank} (raise --max-rank, or mix fewer or lower-rank adapters)")  # fmt: skip


def rank_bound(parts: Iterable[Mapping[str, list[int]]]) -> dict[str, int]:
    """Per module name, Σ over parts of the part's largest rank there (AdapterInfo.ranks):
    an upper bound of the mixture's rank in every layer of that module."""
    totals: dict[str, int] = {}
    for ranks in parts:
        for name, rs in ranks.items():
            totals[name] = totals.get(name, 0) + max(rs, default=0)
    return totals


def mix(parts: Sequence[tuple[str, AdapterWeights, float]], max_rank: int) -> AdapterWeights:
    """The one adapter whose delta is Σ wᵢ ΔWᵢ. parts: (adapter id, converted weights,
    weight). AdapterError (naming the part, module or flag) for a DoRA part, more than
    MAX_MIXTURE_PARTS parts, an id twice, a weight that is not finite, or a module whose
    ranks add up to more than max_rank."""
    check_parts([(name, w) for name, _, w in parts])
    for name, weights, _ in parts:
        check_type(name, weights.adapter_type)
        if any(d.g is not None for d in weights.modules.values()):
            raise AdapterError(f"adapter {name!r} has a DoRA magnitude, which cannot be mixed (it is not linear in ΔW)")
    keys: list[ModuleKey] = sorted({k for _, weights, _ in parts for k in weights.modules})
    totals = {f"layers.{layer}.{mod}": sum(w.modules[(layer, mod)].rank for _, w, _ in parts if (layer, mod) in w.modules)
              for layer, mod in keys}  # fmt: skip
    check_ranks(totals, max_rank)
    modules: dict[ModuleKey, ModuleDelta] = {}
    for key in keys:
        a_parts, b_parts, dtype = [], [], None
        for _, weights, w in parts:
            d = weights.modules.get(key)
            if d is None or d.rank == 0:
                continue
            dtype = dtype or d.a.dtype
            a = d.a.float() if d.rank_scale is None else d.rank_scale.float()[:, None] * d.a.float()  # [r_i, in]
            b = d.b.float() if d.out_scale is None else d.out_scale.float()[:, None] * d.b.float()  # [out, r_i]
            a_parts.append(a)
            b_parts.append(b * (float(w) * d.scale))
        if a_parts:
            modules[key] = ModuleDelta(torch.cat(a_parts, 0).to(dtype), torch.cat(b_parts, 1).to(dtype), 1.0)
    config = {"mixture": [{"adapter_id": name, "weight": float(w), "adapter_type": weights.adapter_type}
                          for name, weights, w in parts]}  # fmt: skip
    return AdapterWeights(MIXTURE_TYPE, modules, config)
