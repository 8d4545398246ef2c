"""LoRA, rsLoRA and DoRA (PEFT peft_type "LORA") -> the one form.

Per target module, with r and alpha from rank_pattern / alpha_pattern when a pattern
matches the module's name (PEFT's get_pattern_key), else the config's r and lora_alpha:

    A = lora_A.weight                       # [r, in]
    B = lora_B.weight                       # [out, r]
    s = alpha / r   (alpha / sqrt(r) with use_rslora)
    g = m / ‖W + s·B·A‖₂ per output row    # DoRA only; m = lora_magnitude_vector [out]

with W the base weight as the forward sees it (NF4 dequantized), as PEFT 0.21's
DoraLinearLayer computes it (get_weight_norm: torch.linalg.norm(W + s·B@A, dim=1)).
PEFT's DoRA forward is base + (g - 1)·(base - bias) + g·s·B(Ax) = g ⊙ (Wx + s·B(Ax)) + bias:
g scales the base *without* its bias (Llama/Mistral linears have none; Qwen2's q/k/v do,
so there the bias must be added after g). lora_bias is refused by config.
"""

from __future__ import annotations

import math

import torch

from .config import AdapterConfig, peft_module_name
from .form import AdapterWeights, BaseModelView
from .registry import AdapterTensors, TensorNames, delta, expect

LORA_A = "lora_A.weight"
LORA_B = "lora_B.weight"
DORA_GPU_ROWS = 1024  # rows of W + s·B·A at a time on a GPU (dora_norm)
MAGNITUDE = "lora_magnitude_vector"  # PEFT >= 0.12 saves DoRA's magnitude under this key (no ".weight")


class LoraType:
    peft_type = "LORA"

    def tensor_names(self, config: AdapterConfig) -> TensorNames:
        names = {LORA_A, LORA_B} | ({MAGNITUDE} if config.use_dora else set())
        return TensorNames(module=frozenset(names))

    def type_name(self, config: AdapterConfig) -> str:
        return "dora" if config.use_dora else "lora"

    def declared_rank(self, config: AdapterConfig, key, shape=None) -> int:
        return config.rank_for(peft_module_name(*key))

    def convert(
        self, config: AdapterConfig, tensors: AdapterTensors, base: BaseModelView, dtype: torch.dtype
    ) -> AdapterWeights:
        modules = {}
        for key, ts in sorted(tensors.modules.items()):
            out, inn = base.module_shape(*key)
            name = peft_module_name(*key)
            r, alpha = config.rank_for(name), config.alpha_for(name)
            note = f", r={r} from adapter_config.json"
            a = expect(ts, LORA_A, (r, inn), key, base, note)  # [r, in]
            b = expect(ts, LORA_B, (out, r), key, base, note)  # [out, r]
            scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
            sources = {"s": f"lora_alpha={alpha!r} / {'sqrt(r)' if config.use_rslora else 'r'}, r={r}",
                       "A": LORA_A, "B": LORA_B, "g": MAGNITUDE}  # fmt: skip
            g = None
            if config.use_dora:
                m = expect(ts, MAGNITUDE, (out,), key, base)  # [out]
                w = base.dense_weight(*key).float()  # [out, in], on the base's device (a GPU: dequantized there)
                g = m / dora_norm(w, a, b, scale, rows=None if w.device.type == "cpu" else DORA_GPU_ROWS)
            modules[key] = delta(key, a, b, float(scale), g, dtype, base=base, sources=sources)
        return AdapterWeights(adapter_type="dora" if config.use_dora else "lora", modules=modules, config=dict(config.raw))


def dora_norm(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, rows: int | None = None) -> torch.Tensor:
    """‖W + s·B·A‖₂ per output row ([out] on the host), computed where W is ([out, in],
    the base's device), in chunks of `rows` rows (None: one piece). The whole [out, in]
    sum is three such buffers at once, 700 MB for Llama-3-8B's MLP: the GPU chunks it
    (DORA_GPU_ROWS); the CPU does not, so that its bits stay PEFT's."""
    a, b = a.to(w.device), b.to(w.device)
    step = rows or w.shape[0]
    return torch.cat([torch.linalg.norm(w[i : i + step] + scale * (b[i : i + step] @ a), dim=1) for i in range(0, w.shape[0], step)]).cpu()


LORA = LoraType()
