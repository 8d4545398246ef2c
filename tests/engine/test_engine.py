"""The engine on the base model: streaming, stops, limits, cancellation, deadlines,
queue bounds, preemption."""

import threading
import time
from pathlib import Path

import pytest

import loraplex
from loraplex.server.engine.errors import EngineDraining, InvalidRequest, QueueFull, UnknownAdapter
from loraplex.server.engine.request import FinishEvent, GenerationRequest, SamplingParams, TokenEvent

# every test twice: sync steps, and each step launched before the previous one's tokens are read
pytestmark = pytest.mark.parametrize("step_mode", ["off", "on"], indirect=True)

PROMPTS = ["the cat", "a dog sees the moon", "my sister", "the robot builds a new house near"]


def _req(engine, prompt, **params):
    return GenerationRequest(engine.tokenizer.encode(prompt), SamplingParams(**params))


def test_stream_concatenates_to_the_final_text(make_engine):
    engine = make_engine()
    handle = engine.submit(_req(engine, "the teacher", max_new_tokens=30))
    events = list(handle.events(timeout=30))
    assert isinstance(events[-1], FinishEvent)
    deltas = [e for e in events if isinstance(e, TokenEvent)]
    final = events[-1]
    assert "".join(e.text for e in deltas) == final.text
    assert final.finish_reason == "length" and final.generated_tokens == 30
    assert final.text == engine.tokenizer.decode(list(final.token_ids))


def test_stop_string_ends_generation_and_is_not_shown(make_engine):
    engine = make_engine()
    free = engine.generate(_req(engine, "the cat", max_new_tokens=40), timeout=30)
    word = free.text.split()[2]  # a word the model will produce
    handle = engine.submit(_req(engine, "the cat", max_new_tokens=40, stop_strings=(word,)))
    events = list(handle.events(timeout=30))
    final = events[-1]
    assert final.finish_reason == "stop"
    assert word not in final.text and free.text.startswith(final.text)
    assert "".join(e.text for e in events[:-1]) == final.text


def test_stop_token_id(make_engine):
    engine = make_engine()
    free = engine.generate(_req(engine, "a small bird", max_new_tokens=20), timeout=30)
    stop_id = free.token_ids[5]
    first = free.token_ids.index(stop_id)
    r = engine.generate(_req(engine, "a small bird", max_new_tokens=20, stop_token_ids=(stop_id,)), timeout=30)
    assert r.finish_reason == "stop" and r.token_ids == free.token_ids[: first + 1]


def test_concurrent_requests_match_alone_and_survive_preemption(make_engine):
    alone_engine = make_engine()
    alone = [alone_engine.generate(_req(alone_engine, p, max_new_tokens=48), timeout=60).token_ids for p in PROMPTS]
    # A KV cache of 12 blocks × 8 tokens cannot hold all four: the scheduler must preempt and recompute.
    engine = make_engine(kv_cache_tokens=96, block_size=8, max_batch_tokens=16)
    handles = [engine.submit(_req(engine, p, max_new_tokens=48)) for p in PROMPTS]
    got = [h.result(timeout=120).token_ids for h in handles]
    assert got == alone
    assert engine.stats().preemptions > 0
    assert engine.blocks.num_used == 0
    engine.blocks.check()


def test_seeded_sampling_is_independent_of_the_batch(make_engine):
    engine = make_engine()
    params = dict(max_new_tokens=24, temperature=0.9, top_p=0.95, seed=7)
    alone = engine.generate(_req(engine, "the old man", **params), timeout=30).token_ids
    others = [engine.submit(_req(engine, p, max_new_tokens=24, temperature=1.0)) for p in PROMPTS]
    mixed = engine.submit(_req(engine, "the old man", **params))
    assert mixed.result(timeout=60).token_ids == alone
    for h in others:
        h.result(timeout=60)


def test_cancel_and_deadline_free_blocks(make_engine):
    engine = make_engine()
    h = engine.submit(_req(engine, "the cat", max_new_tokens=500, ignore_eos=True))
    next(h.events(timeout=30))  # it is running
    h.cancel()
    assert h.result(timeout=30).finish_reason == "cancelled"
    req = _req(engine, "the cat", max_new_tokens=500, ignore_eos=True)
    req.deadline = time.monotonic() + 0.05
    assert engine.submit(req).result(timeout=30).finish_reason == "deadline"
    assert engine.blocks.num_used == 0 and engine.stats().running == 0


def test_invalid_requests_never_enter_the_queue(make_engine):
    engine = make_engine(kv_cache_tokens=256, max_new_tokens=100)
    bad = [
        GenerationRequest([], SamplingParams()),
        GenerationRequest([1, 10_000], SamplingParams()),
        GenerationRequest([1] * 300, SamplingParams(max_new_tokens=1)),
        GenerationRequest([1, 2], SamplingParams(max_new_tokens=101)),
        GenerationRequest([1] * 200, SamplingParams(max_new_tokens=80)),
    ]
    for r in bad:
        with pytest.raises(InvalidRequest):
            engine.submit(r)
    with pytest.raises(UnknownAdapter, match="nope"):
        engine.submit(GenerationRequest([1, 2], SamplingParams(), adapter_id="nope"))
    assert engine.stats().queue_depth == 0


def test_queue_full_then_draining(make_engine):
    engine = make_engine(max_queue=3, max_running=1, max_batch_tokens=8)
    handles = []
    with pytest.raises(QueueFull):
        for _ in range(50):
            handles.append(engine.submit(_req(engine, "the cat", max_new_tokens=200, ignore_eos=True)))
    assert 3 <= len(handles) < 50
    engine.drain()
    with pytest.raises(EngineDraining):
        engine.submit(_req(engine, "the cat"))
    for h in handles:
        h.cancel()
    assert all(h.result(timeout=30).finish_reason == "cancelled" for h in handles)


def test_shutdown_lets_running_requests_finish(make_engine):
    engine = make_engine()
    handles = [engine.submit(_req(engine, p, max_new_tokens=8)) for p in PROMPTS]
    results = []
    t = threading.Thread(target=lambda: results.extend(h.result(timeout=60) for h in handles))
    t.start()
    engine.shutdown(grace_s=30)
    t.join(timeout=60)
    assert [r.finish_reason for r in results] == ["length"] * len(PROMPTS)


def test_a_sampling_failure_ends_only_its_request(make_engine, monkeypatch):
    engine = make_engine()
    real = engine.runner.run

    def broken_rows(plan, **kw):  # NaN logits for the request with seed 666, as a broken adapter would give
        logits = real(plan, **kw).clone()  # the runner's are inference tensors
        wanting = [item.seq for item in plan if item.wants_logits]
        for row, seq in enumerate(wanting):
            if seq.params.seed == 666:
                logits[row, 3] = float("nan")
        return logits

    monkeypatch.setattr(engine.runner, "run", broken_rows)
    good = [engine.submit(_req(engine, p, max_new_tokens=12, temperature=0.7, seed=1)) for p in PROMPTS]
    bad = engine.submit(_req(engine, "the cat", max_new_tokens=12, temperature=0.7, seed=666))
    failed = bad.result(timeout=60)
    assert failed.finish_reason == "error" and failed.error == "sampling failed: the logits are not finite"
    assert [h.result(timeout=60).finish_reason for h in good] == ["length"] * len(PROMPTS)


@pytest.mark.parametrize("requested", [1, None])
def test_cpu_threads_setting_reaches_torch(make_engine, monkeypatch, requested):
    """The engine thread sets its own torch thread count (OpenMP's is per calling thread):
    the configured one, by default every core but one; the adapter helpers' threads run on
    one (threads.py), and an admin conversion leaves its caller's count as it was."""
    import os

    import torch

    calls = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append((threading.current_thread().name, n)), real(n)))
    engine = make_engine(cpu_threads=requested, adapter_root=Path(loraplex.__file__).parent / "assets" / "adapters")
    engine.adapters.wait_validated(timeout=30)
    engine.generate(GenerationRequest(engine.tokenizer.encode("the cat"), SamplingParams(max_new_tokens=2), adapter_id="shout"), timeout=30)
    expected = requested or max(1, len(os.sched_getaffinity(0)) - 1)
    assert [n for name, n in calls if name == "engine"] == [expected]
    helpers = {name.rsplit("_", 1)[0]: n for name, n in calls if name.startswith("adapter-")}
    assert helpers.get("adapter-writer") == 1 and helpers.get("adapter-validator") == 1 and set(helpers.values()) == {1}
    before = torch.get_num_threads()
    engine.adapters.validate(engine.adapters.get("shout").path)
    assert torch.get_num_threads() == before and (threading.current_thread().name, 1) in calls
