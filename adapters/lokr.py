"""LoKr (PEFT peft_type "LOKR", linear layers) -> the one form.

PEFT 0.21's LoKr (`peft.tuners.lokr.layer`) adds, per target module of shape [out, in],

    ΔW = kron(W1, W2) · s,    s = alpha / r

with r, alpha from rank_pattern / alpha_pattern (get_pattern_key), else the config's r and
alpha. The shapes follow `factorization(dim, decompose_factor)` (copied below: (m, n), m·n = dim):

    out_l, out_k = factorization(out);  in_m, in_n = factorization(in)
    W1 [out_l, in_m]: lokr_w1, or lokr_w1_a [out_l, r] @ lokr_w1_b [r, in_m] when
                      decompose_both and r < max(out_l, in_m) / 2
    W2 [out_k, in_n]: lokr_w2, or lokr_w2_a [out_k, r] @ lokr_w2_b [r, in_n] when r < max(out_k, in_n) / 2

Each factor is written W = P Q: a factored one as (w_a, w_b), rank r; a full one F [m, n]
as (I_m, F) when m <= n, else (F, I_n), rank min(m, n). This is exact (no SVD: a trained
factor is generically of full rank, and the identities add no rounding), and its rank is
known from the config and the base's shapes. By the mixed-product property

    kron(P1 Q1, P2 Q2) = kron(P1, P2) · kron(Q1, Q2),   so   B = kron(P1, P2)   # [out, k1·k2]
                                                             A = kron(Q1, Q2)   # [k1·k2, in]

a LoKr module serves at rank k1·k2 = rank(W1)·rank(W2) through the kernels and rank pages
of a LoRA; the loader refuses a module whose rank is over the server's max rank. B and A
are formed in float32, then cast. The file's tensors must be exactly the layout PEFT
builds for the base (PEFT would leave any other factor at its initial value).

lokr_t2 (the CP/Tucker form of W2, for convolutions with use_effective_conv2d) is refused.
"""

from __future__ import annotations

import torch

from .config import AdapterConfig, peft_module_name
from .errors import AdapterError
from .form import AdapterWeights, BaseModelView
from .registry import AdapterTensors, TensorNames, delta, expect, module_label

W1, W1A, W1B, W2, W2A, W2B, T2 = "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT 0.21's (from LyCORIS) `peft.tuners.lokr.layer.factorization`, exactly: (m, n) with
    m·n = dimension, m the factor when it divides dimension, else m <= n near sqrt (or <= factor)."""
    if factor > 0 and (dimension % factor) == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


class _Layout:
    """The factor shapes PEFT builds for one module of shape (out, in)."""

    def __init__(self, config: AdapterConfig, key, shape: tuple[int, int]):
        out, inn = shape
        name = peft_module_name(*key)
        self.r, self.alpha = config.rank_for(name), config.alpha_for(name)
        self.out_l, self.out_k = factorization(out, config.decompose_factor)
        self.in_m, self.in_n = factorization(inn, config.decompose_factor)
        r = self.r
        self.full_w1 = not (config.decompose_both and r < max(self.out_l, self.in_m) / 2)
        self.full_w2 = not (r < max(self.out_k, self.in_n) / 2)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(({W1} if self.full_w1 else {W1A, W1B}) | ({W2} if self.full_w2 else {W2A, W2B}))

    @property
    def ranks(self) -> tuple[int, int]:
        k1 = min(self.out_l, self.in_m) if self.full_w1 else self.r
        k2 = min(self.out_k, self.in_n) if self.full_w2 else self.r
        return k1, k2

    def describe(self) -> str:
        w1 = f"{W1} [{self.out_l}, {self.in_m}]" if self.full_w1 else f"{W1A}/{W1B} (r={self.r})"
        w2 = f"{W2} [{self.out_k}, {self.in_n}]" if self.full_w2 else f"{W2A}/{W2B} (r={self.r})"
        return f"{w1} and {w2}"


def full_pair(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, Q) with P Q = f [m, n] exactly, of rank min(m, n): (I_m, f) when m <= n, else (f, I_n)."""
    m, n = f.shape
    return (torch.eye(m), f) if m <= n else (f, torch.eye(n))


class LoKrType:
    peft_type = "LOKR"

    def tensor_names(self, config: AdapterConfig) -> TensorNames:
        # Which factors are full depends on the base's shapes: convert checks the exact set.
        return TensorNames(module=frozenset(), optional=frozenset({W1, W1A, W1B, W2, W2A, W2B, T2}))

    def type_name(self, config: AdapterConfig) -> str:
        return "lokr"

    def declared_rank(self, config: AdapterConfig, key, shape=None) -> int:
        """rank(W1)·rank(W2) with the base module's shape; without it, the config's r (the
        served rank depends on the shape: it is checked at load)."""
        if shape is None:
            return config.rank_for(peft_module_name(*key))
        k1, k2 = _Layout(config, key, shape).ranks
        return k1 * k2

    def convert(
        self, config: AdapterConfig, tensors: AdapterTensors, base: BaseModelView, dtype: torch.dtype
    ) -> AdapterWeights:
        modules = {}
        for key, ts in sorted(tensors.modules.items()):
            if T2 in ts:
                raise AdapterError(
                    f"{module_label(key)}: {T2} is LoKr's CP (Tucker) decomposition for convolutions "
                    "(use_effective_conv2d); it is not supported: loraplex serves LoKr on linear layers only"
                )
            out, inn = base.module_shape(*key)
            lay = _Layout(config, key, (out, inn))
            if set(ts) != lay.names:
                have = ", ".join(sorted(ts))
                raise AdapterError(
                    f"{module_label(key)}: the file holds {have}, but PEFT builds {lay.describe()} for this module "
                    f"(base out={out}, in={inn}; r={lay.r}, decompose_both={config.decompose_both}, "
                    f"decompose_factor={config.decompose_factor} from adapter_config.json)"
                )
            r, note = lay.r, f", r={lay.r} from adapter_config.json"
            if lay.full_w1:
                p1, q1 = full_pair(expect(ts, W1, (lay.out_l, lay.in_m), key, base))
            else:
                p1, q1 = expect(ts, W1A, (lay.out_l, r), key, base, note), expect(ts, W1B, (r, lay.in_m), key, base, note)
            if lay.full_w2:
                p2, q2 = full_pair(expect(ts, W2, (lay.out_k, lay.in_n), key, base))
            else:
                p2, q2 = expect(ts, W2A, (lay.out_k, r), key, base, note), expect(ts, W2B, (r, lay.in_n), key, base, note)
            b = torch.kron(p1, p2)  # [out, k1·k2]
            a = torch.kron(q1, q2)  # [k1·k2, in]
            w1 = W1 if lay.full_w1 else f"{W1A}, {W1B}"
            w2 = W2 if lay.full_w2 else f"{W2A}, {W2B}"
            sources = {"s": f"alpha={lay.alpha!r} / r, r={r}", "A": f"kron of the right factors of ({w1}) and ({w2})",
                       "B": f"kron of the left factors of ({w1}) and ({w2})"}  # fmt: skip
            modules[key] = delta(key, a, b, float(lay.alpha / r), None, dtype, base=base, sources=sources)
        return AdapterWeights(adapter_type="lokr", modules=modules, config=dict(config.raw))


LOKR = LoKrType()
