"""VeRA (PEFT peft_type "VERA") -> the one form.

VeRA shares two frozen random projections across all target modules, sized for the
largest targeted module: vera_A [r, max_in], vera_B [max_out, r]. Each module trains
two vectors, λ_d [r] and λ_b [out], and PEFT 0.21's forward is
λ_b ⊙ (B_sh[:out, :r] (λ_d ⊙ (A_sh[:r, :in] x))), so per module

    A = vera_A[:r, :in]     # [r, in], shared
    B = vera_B[:out, :r]    # [out, r], shared
    d = λ_d, o = λ_b, s = 1

A and B are the same for every module of that shape and every adapter with the same
projections: their `shared_key` (a digest of the projections, r and the shape) lets the
device pool store them once, so a VeRA adapter costs its two vectors per module.

The projections come from the file (`base_model.vera_A` / `base_model.vera_B`) when
save_projection is true, else they are regenerated exactly as PEFT does: a CPU
torch.Generator seeded with projection_prng_key draws vera_A then vera_B with PEFT's
Kaiming-uniform (`peft.tuners.vera.model._kaiming_init`). Regeneration relies on
torch's CPU generator staying the same across versions, as PEFT itself does.
"""

from __future__ import annotations

import hashlib
import math

import torch

from .config import AdapterConfig
from .errors import AdapterError
from .form import AdapterWeights, BaseModelView
from .registry import AdapterTensors, TensorNames, delta, expect

LAMBDA_B = "vera_lambda_b"
LAMBDA_D = "vera_lambda_d"
_SOURCES = {"s": "VeRA's s = 1", "A": "vera_A", "B": "vera_B", "rank_scale": LAMBDA_D, "out_scale": LAMBDA_B}


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's VeRA `_kaiming_init` on a new float32 tensor: U(-b, b), b = sqrt(3)·sqrt(2)/sqrt(fan_in)."""
    t = torch.empty(shape, dtype=torch.float32)
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    with torch.no_grad():
        return t.uniform_(-bound, bound, generator=generator)


def projections(config: AdapterConfig, max_out: int, max_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vera_A [r, max_in] and vera_B [max_out, r] regenerated from projection_prng_key."""
    gen = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
    vera_a = kaiming_uniform((config.r, max_in), gen)
    vera_b = kaiming_uniform((max_out, config.r), gen)
    return vera_a, vera_b


class VeraType:
    peft_type = "VERA"

    def tensor_names(self, config: AdapterConfig) -> TensorNames:
        shared = {"vera_A", "vera_B"} if config.save_projection else set()
        return TensorNames(module=frozenset({LAMBDA_B, LAMBDA_D}), shared=frozenset(shared))

    def type_name(self, config: AdapterConfig) -> str:
        return "vera"

    def declared_rank(self, config: AdapterConfig, key, shape=None) -> int:
        return config.r

    def convert(
        self, config: AdapterConfig, tensors: AdapterTensors, base: BaseModelView, dtype: torch.dtype
    ) -> AdapterWeights:
        if not tensors.modules:
            raise AdapterError("VeRA adapter has no target modules")
        r = config.r
        # PEFT sizes the projections for the largest targeted module, elementwise (VeraModel._find_dim).
        shapes = [base.module_shape(*key) for key in tensors.modules]
        max_out, max_in = max(s[0] for s in shapes), max(s[1] for s in shapes)
        if config.save_projection:
            vera_a, vera_b = tensors.shared["vera_A"], tensors.shared["vera_B"]
            for name, t, want in (("vera_A", vera_a, (r, max_in)), ("vera_B", vera_b, (max_out, r))):
                if tuple(t.shape) != want:
                    raise AdapterError(
                        f"base_model.{name} has shape {tuple(t.shape)}, expected {want} "
                        f"(r={r}, largest targeted module out={max_out}, in={max_in})"
                    )
            vera_a, vera_b = vera_a.float(), vera_b.float()
        else:
            vera_a, vera_b = projections(config, max_out, max_in)

        digest = projection_digest(vera_a, vera_b)
        a_of, b_of = {}, {}  # one host copy per shape, shared by the modules of this adapter
        modules = {}
        for key, ts in sorted(tensors.modules.items()):
            out, inn = base.module_shape(*key)
            lambda_b = expect(ts, LAMBDA_B, (out,), key, base)  # [out]
            lambda_d = expect(ts, LAMBDA_D, (r,), key, base, f", r={r} from adapter_config.json")  # [r]
            if inn not in a_of:
                a_of[inn] = vera_a[:r, :inn].to(dtype).contiguous()  # [r, in]
            if out not in b_of:
                b_of[out] = vera_b[:out, :r].to(dtype).contiguous()  # [out, r]
            shared = ("vera", digest, r, inn, out, str(dtype))
            modules[key] = delta(key, a_of[inn], b_of[out], 1.0, None, dtype, base=base, sources=_SOURCES,
                                 rank_scale=lambda_d, out_scale=lambda_b, shared_key=shared)  # fmt: skip
        return AdapterWeights(adapter_type="vera", modules=modules, config=dict(config.raw))


def projection_digest(vera_a: torch.Tensor, vera_b: torch.Tensor) -> str:
    """sha256 of the float32 projections: equal digests, equal shared factors."""
    h = hashlib.sha256()
    for t in (vera_a, vera_b):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.float().contiguous().numpy().tobytes())
    return h.hexdigest()


VERA = VeraType()
