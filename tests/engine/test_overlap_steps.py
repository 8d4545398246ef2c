"""Overlapped steps (EngineConfig.overlap_steps): step N+1 is launched before the host
reads step N's tokens, N+1 feeds them from N's ids on the device, and every request gets
the tokens, text and finish it gets with sync steps. test_engine.py and
test_seeded_sampling.py run whole in both modes; this file checks the order itself."""

import time

import pytest
import torch

from loraplex.server.engine.request import FinishEvent, GenerationRequest, SamplingParams, TokenEvent
from loraplex.server.engine.step_context import StepContext, StepInputs
from loraplex.server.model.attention import KVCache
from peft_adapters import save_peft_adapter


def _req(engine, prompt, adapter=None, **params):
    return GenerationRequest(engine.tokenizer.encode(prompt), SamplingParams(**params), adapter_id=adapter)


def _trace(engine, monkeypatch) -> list[tuple]:
    """Records ("launch", [in_flight of each row fed]) per forward and ("land", rows) per
    step whose tokens the host reads, in the order the engine thread does them."""
    events = []
    run, land = engine.runner.run, engine._land

    def traced_run(plan, **kw):
        events.append(("launch", [item.seq.in_flight for item in plan]))
        return run(plan, **kw)

    def traced_land(step):
        events.append(("land", len(step.seqs)))
        land(step)

    monkeypatch.setattr(engine.runner, "run", traced_run)
    monkeypatch.setattr(engine, "_land", traced_land)
    return events


def test_each_step_is_launched_before_the_previous_steps_tokens_are_read(make_engine, monkeypatch):
    results = {}
    for mode in ("off", "on"):
        engine = make_engine(overlap_steps=mode)
        events = _trace(engine, monkeypatch)
        results[mode] = engine.generate(_req(engine, "the cat", max_new_tokens=6, ignore_eos=True), timeout=30)
        kinds = [kind for kind, _ in events]
        if mode == "off":  # each step's tokens are read before the next step is scheduled
            assert kinds == ["launch", "land"] * 6
            assert all(rows == [0] for kind, rows in events if kind == "launch")
        else:  # launch 1, launch 2, land 1, launch 3, land 2, ...: the host reads N while N+1 runs
            assert kinds == ["launch"] + ["launch", "land"] * 5 + ["land"]
            assert [rows for kind, rows in events if kind == "launch"] == [[0]] + [[1]] * 5
        monkeypatch.undo()
    assert results["on"].token_ids == results["off"].token_ids and results["on"].text == results["off"].text


def test_a_request_ending_by_length_is_not_fed_again_and_one_ending_on_a_stop_costs_one_row(make_engine, monkeypatch):
    fed = {}
    for mode in ("off", "on"):
        engine = make_engine(overlap_steps=mode)
        free = engine.generate(_req(engine, "a small bird", max_new_tokens=12, ignore_eos=True), timeout=30)
        stop_id = free.token_ids[4]
        events = _trace(engine, monkeypatch)
        by_length = engine.generate(_req(engine, "a small bird", max_new_tokens=5, ignore_eos=True), timeout=30)
        length_steps = sum(kind == "launch" for kind, _ in events)
        events.clear()
        stopped = engine.generate(_req(engine, "a small bird", max_new_tokens=12, ignore_eos=True, stop_token_ids=(stop_id,)), timeout=30)
        fed[mode] = (length_steps, sum(kind == "launch" for kind, _ in events))
        monkeypatch.undo()
        first = free.token_ids.index(stop_id)
        assert by_length.token_ids == free.token_ids[:5] and by_length.finish_reason == "length"
        assert stopped.token_ids == free.token_ids[: first + 1] and stopped.finish_reason == "stop"
        assert engine.blocks.num_used == 0 and engine.stats().running == 0
    first = free.token_ids.index(stop_id)
    assert fed["off"] == (5, first + 1)
    assert fed["on"] == (5, first + 2)  # the row after the stop was launched before the stop was seen


@pytest.mark.parametrize("end", ["deadline", "cancel"])
def test_a_request_ended_while_a_token_is_in_flight_ends_as_with_sync_steps(make_engine, monkeypatch, end):
    """The deadline passes (or the client cancels) while the step that samples token
    `at` + 1 runs: sync steps stream that token first, and so must overlapped steps."""
    at, expected = (5, ("length", 6)) if end == "deadline" else (3, ("cancelled", 4))
    for mode in ("off", "on"):
        engine = make_engine(overlap_steps=mode)
        request = _req(engine, "the cat", max_new_tokens=6 if end == "deadline" else 10, ignore_eos=True)
        handle = None
        run = engine.runner.run

        def run_then_end(plan, **kw):
            logits = run(plan, **kw)
            if any(item.seq.num_tokens - item.seq.num_prompt == at for item in plan):
                if end == "deadline":
                    request.deadline = time.monotonic() - 1.0
                else:
                    handle.cancel()
            return logits

        monkeypatch.setattr(engine.runner, "run", run_then_end)
        handle = engine.submit(request)
        result = handle.result(timeout=30)
        monkeypatch.undo()
        assert (result.finish_reason, len(result.token_ids)) == expected, mode
        assert engine.blocks.num_used == 0 and engine.stats().running == 0


def test_mixed_adapters_chunked_prefill_stops_and_cancels_give_the_sync_results(make_engine, tmp_path):
    for i, kind in enumerate(["lora", "dora", "vera"]):
        save_peft_adapter(kind, tmp_path / f"{kind}{i}", seed=20 + i, strength=6.0)
    prompts = ["the cat", "a dog sees the moon", "my sister", "the robot builds a new house near", "the old man"]
    adapters = [None, "lora0", "dora1", "vera2"]
    jobs = []
    for i in range(12):
        params = dict(max_new_tokens=8 + 3 * (i % 5), ignore_eos=i % 3 == 0)
        if i % 4 == 1:
            params.update(temperature=0.8, top_p=0.9, seed=i)
        if i % 5 == 2:
            params.update(stop_strings=("e",))
        jobs.append((prompts[i % len(prompts)], adapters[i % len(adapters)], params))
    results = {}
    for mode in ("off", "on"):
        engine = make_engine(overlap_steps=mode, adapter_root=tmp_path, adapter_slots=2, max_batch_tokens=16)
        handles = [engine.submit(_req(engine, p, a, **kw)) for p, a, kw in jobs]
        cancelled = engine.submit(_req(engine, "the cat", "lora0", max_new_tokens=500, ignore_eos=True))
        events = []
        for event in cancelled.events(timeout=60):
            events.append(event)
            if sum(isinstance(e, TokenEvent) for e in events) == 3:
                cancelled.cancel()
        final = events[-1]
        assert isinstance(final, FinishEvent) and final.finish_reason == "cancelled"
        streamed = [t for e in events if isinstance(e, TokenEvent) for t in e.token_ids]
        assert list(final.token_ids) == streamed  # no token lost, none sampled but never shown
        assert "".join(e.text for e in events if isinstance(e, TokenEvent)) == final.text
        results[mode] = [(r.token_ids, r.text, r.finish_reason) for r in (h.result(timeout=120) for h in handles)]
        assert engine.blocks.num_used == 0 and engine.stats().running == 0 and engine.stats().adapter_pins == 0
    assert results["on"] == results["off"]
    assert {reason for _, _, reason in results["on"]} >= {"length", "stop"}


def test_fill_feeds_carried_tokens_from_the_previous_steps_ids_and_a_failed_row_as_0():
    cache = KVCache(1, 4, 4, 1, 8, torch.float32, torch.device("cpu"))
    step = StepContext(cache, max_tokens=8, max_seqs=3, max_blocks=2, num_slots=1, device=torch.device("cpu"))
    previous = torch.tensor([41, -1, 43], dtype=torch.int64)  # [B'] ids of the step before; row 1 failed
    inputs = StepInputs([7, 0, 9, 10, 0], [0, 4, 0, 1, 2], [0, 5, 8, 9, 10], [-1] * 5, [0, 1, 2, 5], [1, 5, 3],
                        [[0], [1, 0], [2]], [0, 1, 4], carry_tokens=[1, 4], carry_rows=[2, 1], carry_from=previous)  # fmt: skip
    step.fill(inputs)
    assert step.input_ids.tolist() == [7, 43, 9, 10, 0]
    step.fill(StepInputs([3, 4], [0, 0], [0, 4], [-1, -1], [0, 1, 2], [1, 1], [[0], [1]], [0, 1]))
    assert step.input_ids.tolist() == [3, 4]  # a step without carried tokens feeds its own ids


def test_the_engine_thread_takes_the_model_device_only_when_it_names_one(monkeypatch):
    """torch.cuda.set_device refuses torch.device("cuda") (no index): the engine thread
    must not call it then, and must for "cuda:1" (events and copies go to its streams)."""
    from loraplex.server.engine import engine as engine_module

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    for device in ("cpu", "cuda", "cuda:1"):
        engine_module.use_device(torch.device(device))
    assert calls == [torch.device("cuda:1")]


def test_a_sequence_preempted_with_its_last_token_in_flight_is_not_recomputed():
    """Preemption can take a sequence the scheduler no longer feeds (its last token in
    flight); admission must not give it a recompute prefill that its landing throws away."""
    from types import SimpleNamespace

    from loraplex.server.engine.block_manager import BlockManager
    from loraplex.server.engine.scheduler import Scheduler, SchedulerConfig
    from loraplex.server.engine.sequence import Sequence

    handle = SimpleNamespace(request=SimpleNamespace(request_id="r0", params=SamplingParams(max_new_tokens=2)))
    seq = Sequence(handle, None, [1, 2, 3, 7], 3, seed=0, in_flight=1, in_flight_row=0)  # 1 generated + 1 in flight
    adapters = SimpleNamespace(prefetch=lambda keys: list(keys))  # base-model requests only: nothing to load
    scheduler = Scheduler(SchedulerConfig(max_batch_tokens=64, max_running=4), BlockManager(16, 16), adapters)
    scheduler.waiting.append(seq)  # as `_preempt` leaves it: num_computed 0, first in line
    assert scheduler.schedule() == [] and list(scheduler.waiting) == [seq] and scheduler.blocks.num_used == 0
