"""The engine's adapter pool in rank pages: adapter_pool_bytes buys pages, not slots of
max_rank, so four rank-16 adapters sit where one rank-64 adapter does; a rank-64
request evicts them, and waits (evicting nothing) while they are pinned."""

import pytest
import torch

from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.adapter_manager import adapter_pool_size
from loraplex.server.engine.request import GenerationRequest, SamplingParams
from loraplex.server.model.config import ModelConfig
from loraplex.server.engine.adapter_pages import adapter_page_bytes, adapter_slot_bytes
from lora_dirs import TINY, write_lora

SLOTS, MAX_RANK = 6, 64  # a max-rank adapter takes 4 pages per target module


def pool_bytes(pages: int) -> int:
    """adapter_pool_bytes that holds `pages` rank pages per target module beside SLOTS slots."""
    c = ModelConfig.from_pretrained(TINY)
    return SLOTS * adapter_slot_bytes(c, torch.float32) + pages * adapter_page_bytes(c, torch.float32)


def _req(engine, adapter, n=8):
    return GenerationRequest(engine.tokenizer.encode("the cat"), SamplingParams(max_new_tokens=n, ignore_eos=True), adapter_id=adapter)


def test_pool_size_from_bytes():
    c = ModelConfig.from_pretrained(TINY)
    cfg = dict(model_dir=TINY, adapter_slots=SLOTS, max_rank=MAX_RANK)
    assert adapter_pool_size(EngineConfig(**cfg, adapter_pool_bytes=pool_bytes(5) + 1), c, torch.float32) == (SLOTS, 5)
    assert adapter_pool_size(EngineConfig(**cfg, adapter_pool_bytes=1 << 40), c, torch.float32) == (SLOTS, SLOTS * 4)  # capped
    with pytest.raises(ValueError, match="cannot hold one adapter of rank 64 beside 6 slots"):
        adapter_pool_size(EngineConfig(**cfg, adapter_pool_bytes=pool_bytes(3)), c, torch.float32)


def test_four_small_adapters_fit_where_one_large_does(make_engine, tmp_path):
    engine = make_engine(adapter_slots=SLOTS, max_rank=MAX_RANK, adapter_pool_bytes=pool_bytes(4))
    assert engine.adapters.pages.num_pages == 4
    small = [f"r16_{i}" for i in range(4)]
    for i, name in enumerate(small):
        engine.adapters.add(name, write_lora(tmp_path / name, rank=16, seed=i))
    engine.adapters.add("r64", write_lora(tmp_path / "r64", rank=64, seed=9))
    solo = {n: engine.generate(_req(engine, n), timeout=60).token_ids for n in small + ["r64"]}
    for key in list(engine.adapters.device.resident):
        engine.adapters.device.remove(key)
    base_evictions = engine.stats().adapter_evictions

    handles = [(n, engine.submit(_req(engine, n, n=200))) for n in small]  # long enough to overlap
    first_events = [next(h.events(timeout=30)) for _, h in handles]  # all four running at once
    assert len(first_events) == 4
    s = engine.stats()
    assert s.adapters_resident == 4 and s.adapter_pages_used == s.adapter_pages_total  # 1 page × 7 modules × 4 layers each
    big = engine.submit(_req(engine, "r64"))  # needs every page: waits for the four to finish
    for n, h in handles:
        assert h.result(timeout=60).token_ids[:8] == solo[n]
    assert big.result(timeout=60).token_ids == solo["r64"]
    s = engine.stats()
    assert s.adapter_evictions - base_evictions == 4 and s.adapters_resident == 1 and s.adapter_pins == 0
    assert s.adapter_pages_used == s.adapter_pages_total  # rank 64: 4 pages in every target module


@pytest.fixture(scope="module")
def vera_dirs(tmp_path_factory):
    from peft_adapters import save_peft_adapter

    root = tmp_path_factory.mktemp("vera")
    for i in range(3):
        save_peft_adapter("vera", root / f"vera{i}", seed=30 + i, strength=6.0)
    return [root / f"vera{i}" for i in range(3)]


@pytest.mark.parametrize("form", ["shared", "folded"])
def test_vera_adapters_share_their_projections(make_engine, vera_dirs, form):
    # three VeRA adapters, same projections (PRNG key 7), rank 16: shared, the pool holds
    # one page per targeted module for all three; folded, one per adapter
    engine = make_engine(adapter_slots=SLOTS, max_rank=MAX_RANK, adapter_pool_bytes=pool_bytes(4), vera_form=form)
    names = [f"v{i}" for i in range(3)]
    for name, path in zip(names, vera_dirs):
        engine.adapters.add(name, path)
    handles = [engine.submit(_req(engine, n, n=200)) for n in names]
    for h in handles:
        next(h.events(timeout=30))
    s = engine.stats()
    targeted = 4 * 4  # q, v, gate, up in 4 layers
    assert s.adapters_resident == 3 and s.adapter_pages_used == (1 if form == "shared" else 3) * targeted
    tokens = [h.result(timeout=60).token_ids[:8] for h in handles]
    solo = [engine.generate(_req(engine, n), timeout=60).token_ids for n in names]
    assert tokens == solo and len({tuple(t) for t in solo}) == 3  # each its own λ
    for key in list(engine.adapters.device.resident):
        engine.adapters.device.remove(key)
    assert engine.stats().adapter_pages_used == 0
