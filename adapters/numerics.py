"""Numerical admission of a converted module delta: an accepted adapter is servable.

A module's delta in the one form, y = g ⊙ (W x + s · o ⊙ (B (d ⊙ (A x)))), is refused
(AdapterError naming the module and the config field or tensor) unless, where the device
pool stores each part (s and d as float32, A, B, g and o in the serving dtype):

1. s, A, B, g, d and o are finite;
2. the delta is on the base's scale (Frobenius norms, with A' = diag(d) A, B' = diag(o) B):

       |s| · ‖B'‖_F · ‖A'‖_F  ≤  DELTA_LIMIT · max(‖W‖_F, 1)

   ‖s B'A'‖₂ ≤ ‖s B'A'‖_F ≤ |s| ‖B'‖_F ‖A'‖_F: an upper bound of the delta's norm (spectral
   or Frobenius) in O(r · (in + out)), without forming the [out, in] product or an SVD.
   ‖W‖_F (W as the forward sees it, NF4 dequantized) is computed once per module and
   base object (`base_norm`). The floor of 1 keeps a zero base module from refusing all.
   DELTA_LIMIT = 1e4 is far above any adapter that does what it was trained for, and far
   below overflow: on the bundled tiny model the demo adapters (trained) reach 4.6e-4 of
   it, the PEFT adapters of the tests (random weights, every type) 2.7e-3, the
   hand-written random LoRAs of tests/support/lora_dirs.py (B ~ N(0, 0.25), alpha = 2r:
   ‖ΔW‖ ≈ 10-250 ‖W‖) 2.5e-2 at rank 64; lora_alpha or weights x1e30 exceed it by 1e20;
3. every entry of s · B'A' and every partial sum of it is finite in the serving dtype:
   |Σ_k B'_ik A'_kj| ≤ ‖B'_i,:‖ ‖A'_:,j‖ (Cauchy-Schwarz), so

       |s| · max_i ‖B'_i,:‖ · max_j ‖A'_:,j‖  ≤  finfo(dtype).max / 2;

4. DoRA's g is at most GAIN_LIMIT in magnitude (g = m / ‖W + s·B·A‖ per row: 1 at
   PEFT's initialisation, near 1 when trained; the demo pirate adapter's peak is 1.3).

What it does not bound: A x for an input x the kernels will see (that depends on x).
"""

from __future__ import annotations

import threading
import weakref
from typing import Mapping

import torch

from .errors import AdapterError
from .form import BaseModelView, ModuleKey

DELTA_LIMIT = 1e4  # |s|·‖B‖_F·‖A‖_F over max(‖W‖_F, 1)
GAIN_LIMIT = 1e3  # max |g| of DoRA
_FLOAT32_MAX = torch.finfo(torch.float32).max

# ‖W‖_F per module, per base object: the weights of a loaded base do not change, and an
# entry goes with its base (weak keys), so nothing needs clearing.
_norms: "weakref.WeakKeyDictionary[object, dict[ModuleKey, float]]" = weakref.WeakKeyDictionary()
_norms_lock = threading.Lock()


def base_norm(base: BaseModelView, key: ModuleKey) -> float:
    """‖W‖_F of the base module `key` (float32; dense_weight dequantizes: cached per base)."""
    with _norms_lock:
        try:
            norms = _norms.setdefault(base, {})
        except TypeError:  # not weak-referenceable: computed each time
            norms = {}
        if key in norms:
            return norms[key]
    value = float(torch.linalg.vector_norm(base.dense_weight(*key).float()))
    with _norms_lock:
        norms[key] = value
    return value


def check_delta(
    label: str,
    parts: Mapping[str, torch.Tensor],
    scale: float,
    dtype: torch.dtype,
    base: BaseModelView,
    key: ModuleKey,
    sources: Mapping[str, str],
) -> None:
    """Refuses a delta that is not servable (the module doc's 1-4). `parts`: A, B and the
    optional g, rank_scale, out_scale, as stored (A, B, g, out_scale in `dtype`);
    `sources`: part name (and "s") -> the config field or tensor it came from."""
    src = lambda n: sources.get(n, n)  # noqa: E731
    if not abs(scale) <= _FLOAT32_MAX:  # also NaN
        raise AdapterError(f"{label}: scale s = {scale!r} ({src('s')}) is not finite in float32, where it is stored")
    for n, t in parts.items():
        if not bool(torch.isfinite(t).all()):
            raise AdapterError(f"{label}: converted {n} ({src(n)}) has NaN or Inf values in {t.dtype}")
    g = parts.get("g")
    if g is not None:
        peak = float(g.float().abs().max()) if g.numel() else 0.0
        if peak > GAIN_LIMIT:
            raise AdapterError(
                f"{label}: DoRA's scale g = m / ‖W + s·B·A‖ reaches {peak:.3g}, over {GAIN_LIMIT:g} "
                f"(check {src('g')})"
            )
    a, b = parts["A"].float(), parts["B"].float()  # [r, in], [out, r]
    if "rank_scale" in parts:
        a = parts["rank_scale"].float()[:, None] * a
    if "out_scale" in parts:
        b = parts["out_scale"].float()[:, None] * b
    if a.numel() == 0 or b.numel() == 0:
        return
    s = abs(scale)
    bound = s * float(torch.linalg.vector_norm(b)) * float(torch.linalg.vector_norm(a))
    w = base_norm(base, key)
    limit = DELTA_LIMIT * max(w, 1.0)
    factors = f"{src('B')} and {src('A')}" + "".join(f", {src(n)}" for n in ("rank_scale", "out_scale") if n in parts)
    if not bound <= limit:
        raise AdapterError(
            f"{label}: the delta's norm bound |s|·‖B‖_F·‖A‖_F = {bound:.3g} is over {DELTA_LIMIT:g} x the base "
            f"weight's Frobenius norm ({w:.3g}); an adapter this large only serves noise "
            f"(s = {scale:.3g} from {src('s')}; check it and {factors})"
        )
    entry = s * float(torch.linalg.vector_norm(b, dim=1).max()) * float(torch.linalg.vector_norm(a, dim=0).max())
    if not entry <= torch.finfo(dtype).max / 2:
        raise AdapterError(
            f"{label}: s·B·A can reach {entry:.3g}, which overflows {dtype} (s = {scale:.3g} from {src('s')}; "
            f"check it and {factors})"
        )
