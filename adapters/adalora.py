"""AdaLoRA (PEFT peft_type "ADALORA") -> the one form.

PEFT 0.21 keeps each module in SVD form, P [out, r] (lora_B), Λ [r, 1] (lora_E),
Q [r, in] (lora_A), and its forward adds

    (x @ (A ⊙ E)ᵀ @ Bᵀ) · scaling / (ranknum + 1e-5)

with ranknum = init_r (a float32 parameter, not saved: PEFT restores init_r on load,
even for modules resized by rank_pattern) and scaling = lora_alpha, or the layer's r
when lora_alpha <= 0. Pruning zeroes entries of E; the config's rank_pattern
(lora_E name -> kept-row mask, written by PEFT at save) also makes PEFT save only the
kept rows, so a module's stored rank is sum(mask). We keep the rows with E ≠ 0:

    A = (A ⊙ E)[E ≠ 0]      # [r', in]
    B = B[:, E ≠ 0]         # [out, r']
    s = scaling / (ranknum + 1e-5)

so ranks differ between modules; a module left with no rows is dropped (its delta is 0).
"""

from __future__ import annotations

import torch

from .config import AdapterConfig
from .errors import AdapterError
from .form import AdapterWeights, BaseModelView
from .registry import AdapterTensors, TensorNames, delta, expect, module_label

LORA_A, LORA_B, LORA_E = "lora_A", "lora_B", "lora_E"

class AdaLoraType:
    peft_type = "ADALORA"

    def tensor_names(self, config: AdapterConfig) -> TensorNames:
        return TensorNames(module=frozenset({LORA_A, LORA_B, LORA_E}))

    def type_name(self, config: AdapterConfig) -> str:
        return "adalora"

    def declared_rank(self, config: AdapterConfig, key, shape=None) -> int:
        masks = config.rank_masks or {}
        return sum(masks[key]) if key in masks else config.init_r

    def convert(
        self, config: AdapterConfig, tensors: AdapterTensors, base: BaseModelView, dtype: torch.dtype
    ) -> AdapterWeights:
        masks = config.rank_masks or {}
        unknown = sorted(set(masks) - set(tensors.modules))
        if unknown:
            raise AdapterError(f"adapter_config.json: rank_pattern names {module_label(unknown[0])}, which has no weights")
        # ranknum is a float32 parameter holding init_r; PEFT adds 1e-5 in float32.
        ranknum = float(torch.tensor(float(config.init_r), dtype=torch.float32) + 1e-5)
        modules = {}
        for key, ts in sorted(tensors.modules.items()):
            out, inn = base.module_shape(*key)
            r = sum(masks[key]) if key in masks else config.init_r
            note = f", rank {r} from adapter_config.json init_r/rank_pattern"
            a = expect(ts, LORA_A, (r, inn), key, base, note)  # [r, in]
            b = expect(ts, LORA_B, (out, r), key, base, note)  # [out, r]
            e = expect(ts, LORA_E, (r, 1), key, base, note)  # [r, 1]
            scaling = config.lora_alpha if config.lora_alpha > 0 else float(r)
            keep = e[:, 0] != 0
            if not bool(keep.any()):
                continue
            sources = {"s": f"lora_alpha={config.lora_alpha!r} (r if <= 0) / (init_r={config.init_r} + 1e-5)",
                       "A": f"{LORA_A} ⊙ {LORA_E}", "B": LORA_B}  # fmt: skip
            modules[key] = delta(key, (a * e)[keep], b[:, keep], float(scaling / ranknum), None, dtype, base=base, sources=sources)
        return AdapterWeights(adapter_type="adalora", modules=modules, config=dict(config.raw))


ADALORA = AdaLoraType()
