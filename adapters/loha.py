"""LoHa (PEFT peft_type "LOHA", linear layers) -> the one form.

PEFT 0.21's LoHa (`peft.tuners.loha.layer.HadaWeight`) adds, per target module,

    ΔW = ((W1a W1b) ⊙ (W2a W2b)) · s,    s = alpha / r

with W1a, W2a = hada_w1_a, hada_w2_a [out, r], W1b, W2b = hada_w1_b, hada_w2_b [r, in], and
r, alpha from rank_pattern / alpha_pattern when a pattern matches the module's name
(get_pattern_key), else the config's r and alpha. The Hadamard product of two rank-r
products is exactly a product of rank r·r: with P = W1a, Q = W1b, U = W2a, V = W2b,

    (P Q) ⊙ (U V) = B · A,   B[:, i·r + j] = P[:, i] ⊙ U[:, j]    # [out, r·r], row-wise Kronecker
                             A[i·r + j, :] = Q[i, :] ⊙ V[j, :]    # [r·r, in]

(Σ_ij P_oi U_oj Q_ic V_jc = (Σ_i P_oi Q_ic)(Σ_j U_oj V_jc)), so a LoHa module serves at rank
r·r through the same kernels and rank pages as a LoRA; config.py refuses an adapter whose
r·r is over the server's max rank. B and A are formed in float32, then cast to the serving
dtype. Differences from PEFT's dense ΔW are float32 rounding of the re-associated sums.

The CP variant (use_effective_conv2d on a convolution: hada_t1, hada_t2) exists only for
conv layers and is refused; PEFT ignores use_effective_conv2d on nn.Linear, so it is inert.
"""

from __future__ import annotations

import torch

from .config import AdapterConfig, peft_module_name
from .errors import AdapterError
from .form import AdapterWeights, BaseModelView
from .registry import AdapterTensors, TensorNames, delta, expect, module_label

W1A, W1B, W2A, W2B = "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"
CP_TENSORS = frozenset({"hada_t1", "hada_t2"})


def hadamard_factors(p: torch.Tensor, q: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r1·r2, in] and B [out, r1·r2] with B·A = (p q) ⊙ (u v); p [out, r1], q [r1, in], u [out, r2], v [r2, in]."""
    out, inn = p.shape[0], q.shape[1]
    b = (p[:, :, None] * u[:, None, :]).reshape(out, p.shape[1] * u.shape[1])  # [out, r1·r2]
    a = (q[:, None, :] * v[None, :, :]).reshape(q.shape[0] * v.shape[0], inn)  # [r1·r2, in]
    return a, b


class LoHaType:
    peft_type = "LOHA"

    def tensor_names(self, config: AdapterConfig) -> TensorNames:
        return TensorNames(module=frozenset({W1A, W1B, W2A, W2B}), optional=CP_TENSORS)

    def type_name(self, config: AdapterConfig) -> str:
        return "loha"

    def declared_rank(self, config: AdapterConfig, key, shape=None) -> int:
        r = config.rank_for(peft_module_name(*key))
        return r * r

    def convert(
        self, config: AdapterConfig, tensors: AdapterTensors, base: BaseModelView, dtype: torch.dtype
    ) -> AdapterWeights:
        modules = {}
        for key, ts in sorted(tensors.modules.items()):
            cp = sorted(CP_TENSORS & ts.keys())
            if cp:
                raise AdapterError(
                    f"{module_label(key)}: {', '.join(cp)} is LoHa's CP (Tucker) decomposition for convolutions "
                    "(use_effective_conv2d); it is not supported: loraplex serves LoHa on linear layers only"
                )
            out, inn = base.module_shape(*key)
            name = peft_module_name(*key)
            r, alpha = config.rank_for(name), config.alpha_for(name)
            note = f", r={r} from adapter_config.json"
            p = expect(ts, W1A, (out, r), key, base, note)  # [out, r]
            q = expect(ts, W1B, (r, inn), key, base, note)  # [r, in]
            u = expect(ts, W2A, (out, r), key, base, note)  # [out, r]
            v = expect(ts, W2B, (r, inn), key, base, note)  # [r, in]
            a, b = hadamard_factors(p, q, u, v)
            sources = {"s": f"alpha={alpha!r} / r, r={r}", "A": f"{W1B} ⊙ {W2B} (row pairs)",
                       "B": f"{W1A} ⊙ {W2A} (column pairs)"}  # fmt: skip
            modules[key] = delta(key, a, b, float(alpha / r), None, dtype, base=base, sources=sources)
        return AdapterWeights(adapter_type="loha", modules=modules, config=dict(config.raw))


LOHA = LoHaType()
