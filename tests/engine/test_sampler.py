"""The batched sampler on CPU: greedy = argmax, per-row parameters, the support of
top-k/top-p, extremes, distributions against softmax (deterministic seed sets, so no
test can be flaky), batch independence, failing rows, the hash against a uint32
reference, and the absence of host synchronisation (the op trace of `sample`)."""

import math
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from loraplex.server.engine.request import SamplingParams
from loraplex.server.engine.sampler import SAMPLING_FAILED, SamplerInputs, SamplingBatch, request_seed, sample, sample_step, stream_bits

S = SamplingParams


def _sample(logits, params, seeds=None, positions=None):
    b = logits.shape[0]
    seeds = list(range(100, 100 + b)) if seeds is None else seeds
    positions = [17] * b if positions is None else positions
    return sample(logits, SamplingBatch.build(params, seeds, positions)).tolist()


def _draws(row, p, n, seeds=None, positions=None):
    """n draws of one logits row: n rows of it, one (seed, position) each."""
    seeds = list(range(n)) if seeds is None else seeds
    positions = [3] * n if positions is None else positions
    return _sample(row.expand(n, -1).contiguous(), [p] * n, seeds, positions)


def _reference_probs(row, p):
    """The distribution the sampler must draw from: temperature → top-k (ties with the
    k-th stay) → softmax → top-p (smallest prefix reaching top_p, ≥ 1 token) → renormalise."""
    x = row.double() / p.temperature
    if 0 < p.top_k < x.numel():
        x = x.masked_fill(x < torch.topk(x, p.top_k).values[-1], float("-inf"))
    probs = torch.softmax(x, -1)
    if p.top_p < 1.0:
        sp, order = torch.sort(probs, descending=True)
        drop = torch.cumsum(sp, -1) - sp >= p.top_p
        drop[0] = False
        sp[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sp)
    return probs / probs.sum()


def _chi2(tokens, probs):
    """Pearson's statistic over the support, and the number of draws outside it."""
    n = len(tokens)
    counts = torch.bincount(torch.tensor(tokens), minlength=probs.numel()).double()
    support = probs > 0
    stat = float(((counts[support] - n * probs[support]) ** 2 / (n * probs[support])).sum())
    return stat, int(counts[~support].sum())


def _chi2_critical(df, z=3.719):
    """Wilson–Hilferty: the upper 1e-4 point (z = 3.719) of chi-square with df degrees."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


LOGITS_13 = torch.tensor([0.3, -1.2, 2.0, 0.9, -0.4, 1.5, 0.0, -2.5, 1.1, 0.6, -0.9, 1.8, 0.2])


def test_greedy_is_argmax():
    logits = torch.randn(9, 1031, generator=torch.Generator().manual_seed(0)) * 5
    params = [S(), S(temperature=0.8, top_k=1), S(top_p=0.1)] * 3
    assert _sample(logits, params) == logits.argmax(-1).tolist()
    mixed = params[:4] + [S(temperature=1.0)] + params[4:8]  # greedy rows beside a sampled one
    got = _sample(torch.cat([logits[:4], logits[:1], logits[4:8]]), mixed)
    assert got[:4] + got[5:] == logits[:8].argmax(-1).tolist()


def test_per_row_params_in_one_batch():
    gen = torch.Generator().manual_seed(1)
    row = torch.arange(100, dtype=torch.float32) / 10
    logits = torch.stack([row[torch.randperm(100, generator=gen)] for _ in range(6)])  # [6, 100]
    params = [S(), S(temperature=1.0, top_k=3), S(temperature=2.0, top_p=0.5), S(temperature=0.5), S(temperature=1.0, top_k=1), S(temperature=5.0, top_k=10, top_p=0.3)]
    for seed in range(200):
        got = _sample(logits, params, seeds=[seed * 7 + i for i in range(6)])
        for b, (token, p) in enumerate(zip(got, params)):
            assert p.greedy or _reference_probs(logits[b], p)[token] > 0, (b, p)
            assert got[b] == _sample(logits[b : b + 1], [p], seeds=[seed * 7 + b])[0]  # = the row alone
        assert got[0] == int(logits[0].argmax()) and got[4] == int(logits[4].argmax())


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.arange(100, dtype=torch.float32) / 10
    assert set(_draws(logits, S(temperature=1.0, top_k=3), 400)) == {97, 98, 99}
    probs = torch.softmax(logits, -1)
    order = torch.argsort(probs, descending=True).tolist()
    nucleus = set(order[: int((torch.cumsum(probs[order], 0) < 0.5).sum()) + 1])
    seen = set(_draws(logits, S(temperature=1.0, top_p=0.5), 600))
    assert seen == nucleus
    both = set(_draws(logits, S(temperature=1.0, top_k=20, top_p=0.5), 600))
    assert both <= set(range(80, 100)) and both == {i for i in range(100) if _reference_probs(logits, S(temperature=1.0, top_k=20, top_p=0.5))[i] > 0}


def test_ties_at_the_cut_stay():
    """Documented: tokens tied with the k-th value (or with the last of the top-p prefix)
    stay, so the support never depends on how the sort orders equal values."""
    logits = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0, 0.0, 2.0])
    assert set(_draws(logits, S(temperature=1.0, top_k=3), 600)) == {1, 2, 3, 4, 6}
    assert set(_draws(logits, S(temperature=1.0, top_p=1e-3), 300)) == {1, 3}


@pytest.mark.parametrize("top_p", [1e-46, 1e-30, 1e-7])
def test_tiny_top_p_returns_the_argmax(top_p):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(40, 259, generator=gen) * 3
    params = [S(temperature=t, top_p=top_p) for t in (0.5, 1.0, 2.0, 100.0)] * 10
    assert _sample(logits, params) == logits.argmax(-1).tolist()


def test_temperature_extremes():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 259, generator=gen)
    # 1e-4: a gap of ≥ 0.002 is ≥ 20 after temperature, beyond the Gumbel noise's range (≈ 19.4)
    top2 = torch.topk(logits, 2).values
    clear = (top2[:, 0] - top2[:, 1] > 2e-3).tolist()
    got = _sample(logits, [S(temperature=1e-4)] * 64, seeds=list(range(64)))
    assert all(g == a for g, a, c in zip(got, logits.argmax(-1).tolist(), clear) if c) and sum(clear) > 50
    # 100: nearly uniform, and exactly softmax(logits / 100)
    row = LOGITS_13 * 10
    p = S(temperature=100.0)
    stat, outside = _chi2(_draws(row, p, 20_000), _reference_probs(row, p))
    assert outside == 0 and stat < _chi2_critical(12)


@pytest.mark.parametrize(
    "params",
    [S(temperature=1.0), S(temperature=0.7), S(temperature=1.0, top_k=5), S(temperature=1.3, top_p=0.8), S(temperature=0.9, top_k=8, top_p=0.9)],
    ids=["T1", "T0.7", "topk5", "topp0.8", "topk8-topp0.9"],
)
@pytest.mark.parametrize("stream", ["seeds", "positions"])
def test_frequencies_match_the_distribution(params, stream):
    """30,000 draws of one row, over 30,000 seeds at one position or one seed over 30,000
    positions. Bound: Pearson's chi-square below its upper 1e-4 point for the support's
    degrees of freedom (a correct sampler passes such a fixed draw with probability
    1 − 1e-4; this one is fixed, so the test is deterministic), and total variation
    below 0.02 (about 3× its expected value at this n). A sampler at a temperature 10%
    off fails the chi-square bound (checked below), so the test has the power to see an error."""
    n = 30_000
    seeds, positions = (list(range(n)), None) if stream == "seeds" else ([7] * n, list(range(n)))
    tokens = _draws(LOGITS_13, params, n, seeds, positions)
    probs = _reference_probs(LOGITS_13, params)
    stat, outside = _chi2(tokens, probs)
    df = int((probs > 0).sum()) - 1
    freq = torch.bincount(torch.tensor(tokens), minlength=13).double() / n
    assert outside == 0
    assert stat < _chi2_critical(df), (stat, _chi2_critical(df))
    assert 0.5 * float((freq - probs).abs().sum()) < 0.02
    wrong = _reference_probs(LOGITS_13, S(temperature=params.temperature * 1.1, top_k=params.top_k, top_p=params.top_p))
    assert _chi2(tokens, wrong)[0] > _chi2_critical(df)


def test_consecutive_positions_are_independent():
    """Pairs (token at position i, token at i + 1) of one seed: their joint frequencies
    match the product distribution (chi-square over 16 cells, df = 15)."""
    row = torch.tensor([0.0, 0.5, 1.0, -0.5])
    n = 40_000
    tokens = _draws(row, S(temperature=1.0), n + 1, [11] * (n + 1), list(range(n + 1)))
    probs = _reference_probs(row, S(temperature=1.0))
    joint = torch.zeros(4, 4, dtype=torch.float64)
    for a, b in zip(tokens[:-1], tokens[1:]):
        joint[a, b] += 1
    expected = n * probs[:, None] * probs[None, :]
    assert float(((joint - expected) ** 2 / expected).sum()) < _chi2_critical(15)


def test_a_row_draws_the_same_alone_at_any_index_in_any_batch():
    gen = torch.Generator().manual_seed(4)
    rng = random.Random(4)
    vocab = 1031  # odd: rows start anywhere in a vector register
    choices = [S(), S(temperature=1.0), S(temperature=0.6, top_k=40), S(temperature=1.5, top_p=0.9), S(temperature=1.0, top_k=1), S(temperature=3.0, top_k=7, top_p=0.5)]
    for trial in range(30):
        target_p = choices[1 + trial % 5] if trial % 6 else S(temperature=1.0)
        row, seed, pos = torch.randn(vocab, generator=gen) * 2, rng.getrandbits(63), rng.randrange(1 << 40)
        alone = _sample(row[None], [target_p], [seed], [pos])[0]
        for index in (0, 3, 6):
            logits = torch.randn(7, vocab, generator=gen) * 2
            logits[index] = row
            params = [rng.choice(choices) for _ in range(7)]
            params[index] = target_p
            seeds = [rng.getrandbits(63) for _ in range(7)]
            positions = [rng.randrange(1000) for _ in range(7)]
            seeds[index], positions[index] = seed, pos
            assert _sample(logits, params, seeds, positions)[index] == alone, (trial, index)


def test_other_seeds_and_positions_draw_other_tokens():
    row = torch.zeros(1000)  # uniform: a draw is the stream's own choice
    by_seed = _draws(row, S(temperature=1.0), 200, list(range(200)), [5] * 200)
    by_position = _draws(row, S(temperature=1.0), 200, [5] * 200, list(range(200)))
    assert len(set(by_seed)) > 150 and len(set(by_position)) > 150 and by_seed != by_position


@pytest.mark.parametrize("bad", ["nan", "inf", "all -inf"])
def test_a_non_finite_row_fails_alone(bad):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(5, 259, generator=gen)
    params = [S(), S(temperature=1.0), S(temperature=0.8, top_p=0.9), S(temperature=1.0, top_k=4), S()]
    before = _sample(logits, params)
    for row in range(5):
        broken = logits.clone()
        if bad == "all -inf":
            broken[row] = float("-inf")
        else:
            broken[row, 17] = float(bad)
        got = _sample(broken, params)
        assert got[row] == SAMPLING_FAILED
        assert got[:row] + got[row + 1 :] == before[:row] + before[row + 1 :]
        assert sample_step(broken[row : row + 1], params[row : row + 1], [1], [2]).tolist() == [SAMPLING_FAILED]
    greedy_only = logits[:2].clone()
    greedy_only[1, 0] = float("nan")
    assert sample_step(greedy_only, [S(), S()], [0, 0], [0, 0]).tolist() == [int(logits[0].argmax()), SAMPLING_FAILED]


def test_minus_inf_entries_are_tokens_never_drawn():
    """Documented: −inf alone is no failure (a future logit mask may use it): those tokens
    just cannot be drawn, on every path."""
    logits = torch.randn(259, generator=torch.Generator().manual_seed(8))
    logits[logits > 0.5] = float("-inf")  # the best tokens are masked
    allowed = set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())
    for p in (S(), S(temperature=1.0), S(temperature=1.0, top_k=5), S(temperature=2.0, top_p=0.9)):
        drawn = set(_draws(logits, p, 300))
        assert drawn <= allowed and (p.greedy or len(drawn) > 1)


def test_the_greedy_path_is_the_argmax_of_the_full_path():
    """sample_step takes the argmax path for a greedy-only batch (host-side choice); the
    full path gives greedy rows the very same tokens."""
    logits = torch.randn(11, 259, generator=torch.Generator().manual_seed(9))
    logits[3, 10] = logits[3, 20] = logits[3].max() + 1  # a tie: the lowest id on both paths
    greedy = [S()] * 11
    fast = sample_step(logits, greedy, list(range(11)), [0] * 11).tolist()
    full = _sample(torch.cat([logits, logits[:1]]), greedy + [S(temperature=1.0, top_p=0.5)])[:11]
    assert fast == full == logits.argmax(-1).tolist() and fast[3] == 10


def _mix32_reference(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _bits_reference(seed, position, v):
    """The stream in plain uint32 arithmetic on Python ints (no overflow by construction)."""
    h = _mix32_reference((seed & 0xFFFFFFFF) ^ 0x243F6A88)
    h = _mix32_reference(h ^ (seed >> 32))
    h = _mix32_reference(h ^ (position & 0xFFFFFFFF))
    k1 = _mix32_reference(h ^ (position >> 32))
    k2 = _mix32_reference(k1 ^ 0x9E3779B9)
    return _mix32_reference(_mix32_reference(v ^ k1) ^ k2)


def test_the_hash_is_the_uint32_reference():
    seeds = [0, 1, 7, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62 + 12345, 2**63 - 1]
    positions = [0, 1, 2**31, 2**32 - 1, 2**32 + 5, 2**40 + 3, 2**62, 9, 2**63 - 1]
    got = stream_bits(torch.tensor(seeds), torch.tensor(positions), 300)  # [9, 300]
    want = [[_bits_reference(s, p, v) for v in range(300)] for s, p in zip(seeds, positions)]
    assert got.tolist() == want
    assert int(got.min()) >= 0 and int(got.max()) < 2**32


@pytest.mark.gpu
def test_the_hash_and_the_draws_are_the_same_on_cuda():
    gen = torch.Generator().manual_seed(6)
    seeds, positions = torch.randint(0, 2**62, (64,), generator=gen), torch.randint(0, 2**40, (64,), generator=gen)
    assert torch.equal(stream_bits(seeds, positions, 4099), stream_bits(seeds.cuda(), positions.cuda(), 4099).cpu())
    logits = torch.randn(64, 4099, generator=gen) * 3
    params = [S(temperature=1.0), S(temperature=0.7, top_k=50), S(temperature=1.2, top_p=0.9), S()] * 16
    cpu = sample(logits, SamplingBatch.build(params, seeds.tolist(), positions.tolist())).tolist()
    cuda = sample(logits.cuda(), SamplingBatch.build(params, seeds.tolist(), positions.tolist(), "cuda")).tolist()
    assert sum(a != b for a, b in zip(cpu, cuda)) <= 1  # an ulp of log() apart can flip only a near tie


def test_sampler_inputs_are_refilled_in_place():
    inputs = SamplerInputs(8, "cpu")
    a = inputs.fill([S(temperature=0.5, top_k=3), S()], [1, 2], [10, 11])
    assert a.size == 2 and a.temperature.tolist() == [0.5, 1.0] and a.top_k.tolist() == [3, 0] and a.greedy.tolist() == [False, True]
    assert not a.all_greedy and a.filtered
    ptr = a.seed.data_ptr()
    b = inputs.fill([S(temperature=1.0)] * 5, [5, 6, 7, 8, 2**63 - 1], [0, 1, 2, 3, 4])
    assert b.seed.data_ptr() == ptr and b.seed.tolist() == [5, 6, 7, 8, 2**63 - 1] and b.position.tolist() == [0, 1, 2, 3, 4]
    assert b.top_p.tolist() == [1.0] * 5 and not b.filtered
    assert inputs.fill([S()], [0], [0]).all_greedy
    with pytest.raises(ValueError, match="1 to 8 rows"):
        inputs.fill([S()] * 9, [0] * 9, [0] * 9)


def test_unseeded_requests_get_their_own_seed():
    assert request_seed(S(temperature=1.0, seed=42)) == 42
    drawn = {request_seed(S(temperature=1.0)) for _ in range(100)}
    assert len(drawn) == 100 and all(0 <= s < 2**63 for s in drawn)


# -- no host synchronisation ------------------------------------------------------------
HOST_SYNC_OPS = ("_local_scalar_dense", "item", "nonzero", "masked_select", "unique", "is_nonzero", "equal", "masked_scatter")


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = tuple(tuple(t.shape) for t in tree_flatten((args, kwargs or {}, out))[0] if isinstance(t, torch.Tensor))
        self.ops.append((func.__name__, shapes))
        return out


@pytest.mark.parametrize(
    "params",
    [
        [S()] * 5,  # the argmax path
        [S(temperature=1.0), S(), S(temperature=0.3), S(temperature=2.0), S(temperature=1.0, top_k=1)],
        [S(temperature=1.0, top_k=5), S(), S(temperature=0.5, top_p=0.9), S(temperature=1.0), S(temperature=2.0, top_k=3, top_p=0.2)],
    ],
    ids=["greedy", "temperature", "top-k-top-p"],
)
def test_sample_never_synchronises_and_its_ops_do_not_depend_on_the_values(params):
    gen = torch.Generator().manual_seed(7)
    traces = []
    for trial in range(2):
        logits = torch.randn(5, 259, generator=gen) * (1 + 4 * trial)
        if trial:
            logits[2, 9] = float("nan")  # a failing row changes no op either
            params = [  # other values, the same path (greedy rows, filtered or not)
                S(temperature=p.temperature * 1.5, top_k=p.top_k + (p.top_k > 1), top_p=p.top_p / 2 if p.top_p < 1 else 1.0) for p in params
            ]
        batch = SamplingBatch.build(params, [trial * 1000 + i for i in range(5)], [trial * 50 + i for i in range(5)])
        with OpRecorder() as rec:
            sample(logits, batch)
        traces.append(rec.ops)
        names = {name.split(".")[0] for name, _ in rec.ops}
        assert not names & set(HOST_SYNC_OPS), names & set(HOST_SYNC_OPS)
    assert traces[0] == traces[1]


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
