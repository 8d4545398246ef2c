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
    names = ("lora0", "dora1", "vera2")
    engine = make_engine()
    a = engine.adapters
    sizes = [a.pages.stage(a.convert(adapter_dirs[n])).nbytes for n in names]
    host = a.host
    host.budget_bytes = max(sizes)  # holds about one staged adapter
    for name in names:
        a.add(name, adapter_dirs[name])
    first = {n: engine.generate(_req(engine, n), timeout=60).token_ids for n in ("lora0", "dora1", "vera2")}
    for key in list(engine.adapters.device.resident):  # evict everything from the device too (the engine is idle)
        engine.adapters.device.remove(key)
    again = {n: engine.generate(_req(engine, n), timeout=60).token_ids for n in ("vera2", "lora0", "dora1")}
    assert again == first
    assert host.nbytes <= host.budget_bytes and len(host) < 3  # the cache never exceeds its budget


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


def test_a_request_queued_after_a_replace_binds_the_new_version_even_while_the_old_is_pinned(make_engine, adapter_dirs):
    engine = make_engine(max_running=2)
    engine.adapters.add("new-ref", adapter_dirs["vera2"])
    new_tokens = engine.generate(_req(engine, "new-ref"), timeout=60).token_ids
    engine.adapters.add("a", adapter_dirs["lora0"])
    old_tokens = engine.generate(_req(engine, "a"), timeout=60).token_ids
    assert old_tokens != new_tokens
    running = engine.submit(_req(engine, "a", n=60))  # pins the old version in its slot
    next(running.events(timeout=30))
    blocker = engine.submit(_req(engine, None, n=60))  # fills the second running place
    next(blocker.events(timeout=30))
    queued = engine.submit(_req(engine, "a"))  # queued before the replace, with the old key
    engine.adapters.add("a", adapter_dirs["vera2"], replace=True)
    assert running.result(timeout=60).token_ids[:12] == old_tokens  # the running request keeps its version
    assert queued.result(timeout=60).token_ids == new_tokens  # admitted after the replace: the current version
    blocker.result(timeout=60)
    assert engine.stats().adapter_pins == 0


def test_a_failing_device_write_ends_only_that_adapters_requests(make_engine, adapter_dirs, monkeypatch):
    engine = make_engine()
    for name in ("lora0", "dora1", "broken"):
        engine.adapters.add(name, adapter_dirs["vera2" if name == "broken" else name])
    solo = {n: engine.generate(_req(engine, n, n=30), timeout=60).token_ids for n in ("lora0", "dora1", None)}
    for key in list(engine.adapters.device.resident):
        engine.adapters.device.remove(key)
    broken_key = engine.adapters.key_of("broken")
    real_apply = engine.adapters.pages.apply

    def apply(plan):
        if plan.staged is engine.adapters.host.get(broken_key):
            raise RuntimeError("injected device write failure")
        real_apply(plan)

    monkeypatch.setattr(engine.adapters.pages, "apply", apply)
    others = {n: engine.submit(_req(engine, n, n=30)) for n in ("lora0", "dora1", None)}
    next(others[None].events(timeout=30))
    failing = [engine.submit(_req(engine, "broken")) for _ in range(3)]
    for h in failing:
        r = h.result(timeout=60)
        assert r.finish_reason == "error" and "'broken'" in r.error and "injected device write failure" in r.error
    assert {n: h.result(timeout=60).token_ids for n, h in others.items()} == solo
    s = engine.stats()
    assert s.adapter_pins == 0 and engine.blocks.num_used == 0
    assert ("broken" not in [k[0] for k in engine.adapters.device.resident]) and s.adapter_load_failures >= 3
    assert sum(engine.adapters.pages.pages_free()) + s.adapter_pages_used == s.adapter_pages_total


def test_directories_register_from_their_config_and_are_validated_in_the_background(make_engine, adapter_dirs, tmp_path, caplog):
    import logging

    root = tmp_path / "root"
    for i in range(40):
        shutil.copytree(adapter_dirs["lora0" if i % 2 else "dora1"], root / f"a{i:02d}")
    broken = root / "zz-broken"
    shutil.copytree(adapter_dirs["lora0"], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 64)  # the config is fine; the weights are not
    engine = make_engine(adapter_slots=4)
    with caplog.at_level(logging.WARNING):
        engine.register_adapter_root(root)
        assert len(engine.adapters) == 41  # registered from their configs, the broken one too (for now)
        info = engine.adapters.get("a01")
        assert info.adapter_type == "lora" and info.ranks == engine.adapters.validate(adapter_dirs["lora0"]).ranks
        assert engine.adapters.get("a00").adapter_type == "dora"
        served = engine.generate(_req(engine, "a07"), timeout=60)  # usable before its background validation
        assert served.finish_reason == "length"
        engine.adapters.wait_validated(120)
    assert len(engine.adapters) == 40 and "zz-broken" not in engine.adapters
    assert all(i.validated for i in engine.adapters.list())
    assert any("skipping adapter zz-broken" in r.getMessage() for r in caplog.records)
    assert engine.generate(_req(engine, "a07"), timeout=60).token_ids == served.token_ids


def test_host_cache_offer_never_evicts(make_engine, adapter_dirs):
    engine = make_engine()
    a = engine.adapters
    staged = a.pages.stage(a.convert(adapter_dirs["lora0"]))
    a.host.budget_bytes = staged.nbytes + 1
    assert a.host.offer(("x", 1), staged) and not a.host.offer(("y", 1), staged)  # no room: nothing dropped
    assert ("x", 1) in a.host and ("y", 1) not in a.host and a.host.nbytes <= a.host.budget_bytes
