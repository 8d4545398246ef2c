import pytest
import torch

from loraplex.server.engine.request import SamplingParams
from loraplex.server.engine.sampler import make_generator, sample, sample_one


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    params = [SamplingParams()] * 4
    assert sample(logits, params, [None] * 4) == logits.argmax(-1).tolist()


def test_seed_makes_sampling_repeatable():
    logits = torch.randn(300)
    p = SamplingParams(temperature=1.0, seed=1234)
    a = [sample_one(logits, p, g) for g in [make_generator(p)] for _ in range(20)]
    b = [sample_one(logits, p, g) for g in [make_generator(p)] for _ in range(20)]
    assert a == b and len(set(a)) > 1


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.arange(100, dtype=torch.float32) / 10
    pk = SamplingParams(temperature=1.0, top_k=3, seed=0)
    g = make_generator(pk)
    assert {sample_one(logits, pk, g) for _ in range(200)} <= {97, 98, 99}
    probs = torch.softmax(logits, -1)
    pp = SamplingParams(temperature=1.0, top_p=0.5, seed=0)
    g = make_generator(pp)
    seen = {sample_one(logits, pp, g) for _ in range(300)}
    order = torch.argsort(probs, descending=True).tolist()
    nucleus = set(order[: int((torch.cumsum(probs[order], 0) < 0.5).sum()) + 1])
    assert seen <= nucleus and len(seen) > 1


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=1e-40), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(seed=-1), "seed"),
        (dict(stop_strings=("",)), "stop strings"),
    ],
)
def test_impossible_params_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)
