"""Seeded sampling through the engine: a request draws the same tokens alone, beside
valid neighbours, beside neighbours whose sampling fails (NaN logits in their rows, as
a broken adapter would give), and across preemption and recompute."""

import pytest

from loraplex.server.engine.request import FINISH_ERROR, FINISH_LENGTH, GenerationRequest, SamplingParams
from loraplex.server.engine.sampler import SAMPLING_FAILED_ERROR

# every test twice: sync steps, and each step launched before the previous one's tokens are read
pytestmark = pytest.mark.parametrize("step_mode", ["off", "on"], indirect=True)

TARGET = dict(max_new_tokens=48, temperature=1.0, seed=7, ignore_eos=True)
NEIGHBOURS = [
    ("a dog sees the moon", dict(max_new_tokens=30, ignore_eos=True)),  # greedy
    ("my sister", dict(max_new_tokens=40, temperature=0.8, top_k=5, seed=11, ignore_eos=True)),
    ("the robot builds a new house near", dict(max_new_tokens=20, temperature=1.2, top_p=0.9, ignore_eos=True)),  # unseeded
    ("the cat", dict(max_new_tokens=44, temperature=1.0, seed=7, ignore_eos=True)),  # the same seed, another prompt
]


def _req(engine, prompt, **params):
    return GenerationRequest(engine.tokenizer.encode(prompt), SamplingParams(**params))


def _break_rows(engine, monkeypatch, failing):
    """Makes the runner return NaN logits for the rows of requests in `failing`
    (request id -> number of tokens they generate before their logits break)."""
    real = engine.runner.run

    def run(plan, **kw):
        logits = real(plan, **kw).clone()  # the runner's are inference tensors
        for row, seq in enumerate(item.seq for item in plan if item.wants_logits):
            after = failing.get(seq.seq_id)
            if after is not None and seq.num_tokens - seq.num_prompt >= after:  # tokens in flight count
                logits[row, 5] = float("nan")
        return logits

    monkeypatch.setattr(engine.runner, "run", run)


def test_a_seeded_request_draws_the_same_tokens_in_any_company(make_engine, monkeypatch):
    engine = make_engine()
    alone = engine.generate(_req(engine, "the old man", **TARGET), timeout=60)
    assert alone.finish_reason == FINISH_LENGTH and len(alone.token_ids) == 48
    solo = {p: engine.generate(_req(engine, p, **kw), timeout=60).token_ids for p, kw in NEIGHBOURS if kw.get("seed") or "temperature" not in kw}
    assert engine.generate(_req(engine, "the old man", **TARGET), timeout=60).token_ids == alone.token_ids

    # beside valid neighbours
    others = [engine.submit(_req(engine, p, **kw)) for p, kw in NEIGHBOURS]
    mixed = engine.submit(_req(engine, "the old man", **TARGET))
    assert mixed.result(timeout=60).token_ids == alone.token_ids
    for (prompt, _), h in zip(NEIGHBOURS, others):
        result = h.result(timeout=60)
        assert result.finish_reason == FINISH_LENGTH
        assert prompt not in solo or result.token_ids == solo[prompt]

    # beside neighbours whose logits break: at once, after 3 tokens, after 10
    failing_reqs = [
        _req(engine, "a dog sees the moon", max_new_tokens=30, temperature=1.0, seed=3, ignore_eos=True),
        _req(engine, "my sister", max_new_tokens=30, ignore_eos=True),
        _req(engine, "the robot builds", max_new_tokens=30, temperature=0.7, top_p=0.8, seed=5, ignore_eos=True),
    ]
    _break_rows(engine, monkeypatch, {r.request_id: after for r, after in zip(failing_reqs, (0, 3, 10))})
    bad = [engine.submit(r) for r in failing_reqs]
    good = [engine.submit(_req(engine, p, **kw)) for p, kw in NEIGHBOURS if p in solo]
    target = engine.submit(_req(engine, "the old man", **TARGET))
    assert target.result(timeout=60).token_ids == alone.token_ids
    for h, after in zip(bad, (0, 3, 10)):
        result = h.result(timeout=60)
        assert result.finish_reason == FINISH_ERROR and result.error == SAMPLING_FAILED_ERROR
        assert len(result.token_ids) == after
    assert [h.result(timeout=60).token_ids for h in good] == [solo[p] for p, _ in NEIGHBOURS if p in solo]
    assert engine.blocks.num_used == 0 and engine.stats().running == 0


def test_seeded_draws_survive_preemption_and_recompute(make_engine):
    prompts = ["the cat", "a dog sees the moon", "my sister", "the robot builds a new house near"]
    params = [dict(max_new_tokens=48, temperature=1.0, seed=100 + i, ignore_eos=True) for i in range(4)]
    alone_engine = make_engine()
    alone = [alone_engine.generate(_req(alone_engine, p, **kw), timeout=60).token_ids for p, kw in zip(prompts, params)]
    # 12 blocks × 8 tokens cannot hold all four: the scheduler preempts and recomputes
    engine = make_engine(kv_cache_tokens=96, block_size=8, max_batch_tokens=16)
    handles = [engine.submit(_req(engine, p, **kw)) for p, kw in zip(prompts, params)]
    assert [h.result(timeout=120).token_ids for h in handles] == alone
    assert engine.stats().preemptions > 0
