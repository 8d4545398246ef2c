"""Adapters in the running engine: unknown ids, LRU eviction past the pool's slots,
replace and remove while requests run, failed loads, host-cache reloads."""

import shutil

import pytest

from loraplex.adapters.errors import AdapterError, AdapterExists
from loraplex.server.engine.errors import UnknownAdapter
from loraplex.server.engine.request import GenerationRequest, SamplingParams
from peft_adapters import save_peft_adapter


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    dirs = {}
    for i, kind in enumerate(["lora", "dora", "vera", "lora", "rslora"]):
        name = f"{kind}{i}"
        save_peft_adapter(kind, root / name, seed=10 + i, strength=6.0)
        dirs[name] = root / name
    return dirs


def _req(engine, adapter, n=12, prompt="the cat"):
    return GenerationRequest(engine.tokenizer.encode(prompt), SamplingParams(max_new_tokens=n, ignore_eos=True), adapter_id=adapter)


def test_unknown_adapter_is_refused_never_served_as_base(make_engine):
    engine = make_engine()
    with pytest.raises(UnknownAdapter):
        engine.submit(_req(engine, "missing"))
    with pytest.raises(UnknownAdapter):
        engine.adapters.get("missing")
    with pytest.raises(UnknownAdapter):
        engine.adapters.remove("missing")


def test_more_adapters_than_slots_evicts_least_recently_used(make_engine, adapter_dirs):
    engine = make_engine(adapter_slots=2)
    assert engine.model.num_slots == 2
    for name, path in adapter_dirs.items():
        engine.adapters.add(name, path)
    names = list(adapter_dirs)
    expected = {n: engine.generate(_req(engine, n), timeout=60).token_ids for n in names}
    base = engine.generate(_req(engine, None), timeout=60).token_ids
    assert len(set(expected.values()) | {base}) == len(names) + 1  # every adapter changes the output
    handles = [(n, engine.submit(_req(engine, n))) for n in names * 2]  # all at once, 2 slots
    for n, h in handles:
        assert h.result(timeout=120).token_ids == expected[n]
    stats = engine.stats()
    assert stats.adapter_evictions > 0 and stats.adapters_resident <= 2 and stats.adapter_pins == 0
    resident = [i.adapter_id for i in engine.adapters.list() if i.resident]
    assert len(resident) == 2


def test_replace_and_remove_while_requests_run(make_engine, adapter_dirs):
    engine = make_engine()
    engine.adapters.add("a", adapter_dirs["lora0"])
    old = engine.generate(_req(engine, "a"), timeout=60).token_ids
    with pytest.raises(AdapterExists):
        engine.adapters.add("a", adapter_dirs["dora1"])
    running = engine.submit(_req(engine, "a", n=60))
    next(running.events(timeout=30))
    engine.adapters.add("a", adapter_dirs["dora1"], replace=True)
    new = engine.generate(_req(engine, "a"), timeout=60).token_ids
    assert new != old
    first = running.result(timeout=60)
    assert first.finish_reason == "length" and first.token_ids[: len(old)] == old  # finished on the old version
    running = engine.submit(_req(engine, "a", n=60))
    next(running.events(timeout=30))
    engine.adapters.remove("a")
    assert running.result(timeout=60).finish_reason == "length"
    with pytest.raises(UnknownAdapter):
        engine.submit(_req(engine, "a"))
    engine.generate(_req(engine, None, n=2), timeout=30)  # a step processes the retirement
    assert engine.stats().adapters_resident == 0 and engine.stats().adapter_pins == 0


def test_a_failed_replace_keeps_the_old_version(make_engine, adapter_dirs, tmp_path):
    engine = make_engine()
    engine.adapters.add("a", adapter_dirs["vera2"])
    before = engine.generate(_req(engine, "a"), timeout=60).token_ids
    broken = tmp_path / "broken"
    shutil.copytree(adapter_dirs["lora3"], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(AdapterError):
        engine.adapters.add("a", broken, replace=True)
    assert engine.generate(_req(engine, "a"), timeout=60).token_ids == before
    assert engine.stats().adapter_load_failures == 1


def test_host_cache_eviction_reloads_in_the_background(make_engine, adapter_dirs):
    engine = make_engine(host_cache_bytes=1)  # keeps at most one converted adapter on the host
    for name in ("lora0", "dora1", "vera2"):
        engine.adapters.add(name, adapter_dirs[name])
    first = {n: engine.generate(_req(engine, n), timeout=60).token_ids for n in ("lora0", "dora1", "vera2")}
    for key in list(engine.pool.resident):  # evict everything from the device too (the engine is idle)
        engine.pool.remove(key)
    again = {n: engine.generate(_req(engine, n), timeout=60).token_ids for n in ("vera2", "lora0", "dora1")}
    assert again == first


def test_removed_or_replaced_while_waiting_ends_only_that_request(make_engine, adapter_dirs):
    """A queued request whose adapter is unloaded ends with "adapter_removed" (NOT_FOUND at
    the API); one whose adapter is replaced runs on the new version; nothing else fails."""
    engine = make_engine(max_running=1)
    engine.adapters.add("gone", adapter_dirs["lora0"])
    engine.adapters.add("swapped", adapter_dirs["dora1"])
    engine.adapters.add("reference", adapter_dirs["vera2"])
    expected_new = engine.generate(_req(engine, "reference"), timeout=60).token_ids
    blocker = engine.submit(_req(engine, None, n=40))  # holds the only running place
    next(blocker.events(timeout=30))
    waiting_gone = engine.submit(_req(engine, "gone"))
    waiting_swapped = engine.submit(_req(engine, "swapped"))
    engine.adapters.remove("gone")
    engine.adapters.add("swapped", adapter_dirs["vera2"], replace=True)
    assert blocker.result(timeout=60).finish_reason == "length"
    gone = waiting_gone.result(timeout=60)
    assert gone.finish_reason == "adapter_removed" and "gone" in gone.error
    swapped = waiting_swapped.result(timeout=60)
    assert swapped.finish_reason == "length" and swapped.token_ids == expected_new
    assert engine.stats().adapter_pins == 0 and engine.blocks.num_used == 0
