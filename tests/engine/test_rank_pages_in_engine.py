"""The engine's adapter pool in rank pages: adapter_pool_bytes buys pages, not slots of
max_rank, so four rank-16 adapters sit where one rank-64 adapter does; a rank-64
request evicts them, and waits (evicting nothing) while they are pinned."""

import pytest
import torch

from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.engine import adapter_pool_size
from loraplex.server.engine.request import GenerationRequest, SamplingParams
from loraplex.server.model.config import ModelConfig
from loraplex.server.model.llama import adapter_page_bytes, adapter_slot_bytes
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
    assert engine.model.num_pages == 4
    small = [f"r16_{i}" for i in range(4)]
    for i, name in enumerate(small):
        engine.adapters.add(name, write_lora(tmp_path / name, rank=16, seed=i))
    engine.adapters.add("r64", write_lora(tmp_path / "r64", rank=64, seed=9))
    solo = {n: engine.generate(_req(engine, n), timeout=60).token_ids for n in small + ["r64"]}
    for key in list(engine.pool.resident):
        engine.pool.remove(key)
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
