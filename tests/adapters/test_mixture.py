"""adapters/mixture.py: a mixture's delta is Σ wᵢ ΔWᵢ in every module, folded into
one ModuleDelta of scale 1 whose rank is the sum of the parts'; every refusal names
what is wrong."""

import math

import pytest
import torch

from loraplex.adapters.errors import AdapterError
from loraplex.adapters.form import AdapterWeights, ModuleDelta
from loraplex.adapters.mixture import MAX_MIXTURE_PARTS, check_ranks, mix, rank_bound

OUT, IN = 12, 10


def _delta(r, seed, scale=1.0, vera=False, dora=False):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(r, IN, generator=g), torch.randn(OUT, r, generator=g)
    if vera:
        return ModuleDelta(a, b, 1.0, rank_scale=torch.randn(r, generator=g), out_scale=torch.randn(OUT, generator=g),
                           shared_key=("vera", seed))  # fmt: skip
    return ModuleDelta(a, b, scale, g=torch.rand(OUT, generator=g) + 0.5 if dora else None)


def _adapter(kind, modules):
    return AdapterWeights(kind, modules)


def test_mixture_delta_is_the_weighted_sum():
    lora = _adapter("lora", {(0, "q_proj"): _delta(4, 1, scale=2.0), (1, "v_proj"): _delta(2, 2, scale=0.5)})
    vera = _adapter("vera", {(0, "q_proj"): _delta(3, 3, vera=True), (0, "up_proj"): _delta(3, 4, vera=True)})
    ada = _adapter("adalora", {(0, "q_proj"): _delta(5, 5, scale=1.7), (1, "v_proj"): _delta(0, 6)})
    parts = [("l", lora, 0.7), ("v", vera, -1.3), ("a", ada, 0.25)]
    m = mix(parts, max_rank=12)
    assert m.adapter_type == "mixture" and set(m.modules) == {(0, "q_proj"), (1, "v_proj"), (0, "up_proj")}
    assert m.modules[(0, "q_proj")].rank == 4 + 3 + 5 and m.modules[(1, "v_proj")].rank == 2
    for key, d in m.modules.items():
        assert d.scale == 1.0 and d.g is None and d.rank_scale is None and d.out_scale is None and d.shared_key is None
        want = sum(w * p.modules[key].dense() for _, p, w in parts if key in p.modules)
        torch.testing.assert_close(d.dense(), want, atol=1e-5, rtol=1e-5)


def _one(kind="lora", r=4, seed=0):
    return _adapter(kind, {(0, "q_proj"): _delta(r, seed, dora=kind == "dora")})


@pytest.mark.parametrize("parts, max_rank, message", [
    ([("d", _one("dora"), 1.0)], 64, "adapter 'd' is DoRA, which cannot be mixed: its magnitude rescales W + ΔW row-wise"),
    ([(f"a{i}", _one(seed=i), 1.0) for i in range(MAX_MIXTURE_PARTS + 1)], 64, "a mixture has at most 8 adapters, got 9"),
    ([("a", _one(r=8), 1.0), ("b", _one(r=9, seed=1), 1.0)], 16,
     "the mixture has rank 17 in layers.0.q_proj (the parts' ranks add up), over --max-rank 16 (raise --max-rank"),
    ([("a", _one(), math.nan)], 64, "the weight of adapter 'a' in the mixture must be a finite number, got nan"),
    ([("a", _one(), math.inf)], 64, "the weight of adapter 'a' in the mixture must be a finite number, got inf"),
    ([("a", _one(), 1.0), ("a", _one(), 0.5)], 64, "adapter 'a' appears twice in the mixture"),
    ([], 64, "a mixture needs at least one adapter"),
])  # fmt: skip
def test_refusals(parts, max_rank, message):
    with pytest.raises(AdapterError) as e:
        mix(parts, max_rank)
    assert message in str(e.value)


def test_rank_bound_is_the_sum_of_each_parts_largest_rank():
    totals = rank_bound([{"q_proj": [8, 4], "v_proj": [2]}, {"q_proj": [4, 16]}])
    assert totals == {"q_proj": 24, "v_proj": 2}
    with pytest.raises(AdapterError, match=r"rank up to 24 in q_proj .* over --max-rank 16"):
        check_ranks(totals, 16, exact=False)
