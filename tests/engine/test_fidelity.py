"""Fidelity against PEFT: adapters made with PEFT on the same NF4 base give the same
logits in loraplex (fp32, atol/rtol 1e-4 on logits of magnitude ~10), and greedy
generations are token-identical; a mixed batch gives every request its solo tokens."""

import time

import pytest
import torch

from loraplex.adapters.loader import load_adapter_dir
from loraplex.server.engine.request import GenerationRequest, SamplingParams
from loraplex.server.model.llama import score_sequence
from loraplex.server.engine.adapter_pages import AdapterPages
from loraplex.server.model.loader import LoadSpec, load_model
from peft_adapters import ALL_KINDS as KINDS, TINY, save_peft_adapter  # with LoHa and LoKr

LOGITS_TOL = dict(atol=1e-4, rtol=1e-4)
PROMPTS = ["the cat", "a small bird watches", "our team builds the garden every"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def peft_adapters(tmp_path_factory):
    """kind -> (directory, PEFT model)."""
    root = tmp_path_factory.mktemp("peft")
    return {kind: (root / kind, save_peft_adapter(kind, root / kind, seed=i)) for i, kind in enumerate(KINDS)}


@pytest.fixture(scope="module")
def runner_model():
    model = load_model(TINY, LoadSpec())
    return model, AdapterPages(model, len(KINDS), 32)


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_peft(kind, peft_adapters, runner_model):
    path, peft_model = peft_adapters[kind]
    runner_model, pages = runner_model
    weights = load_adapter_dir(path, runner_model, max_rank=32, dtype=torch.float32)
    slot = KINDS.index(kind)
    pages.write(slot, weights)
    ids = [1] + [b + 3 for b in b"the teacher paints a blue boat"]  # byte ids follow the 3 specials
    with torch.no_grad():
        ref = peft_model(torch.tensor([ids])).logits[0]
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            base_ref = base(torch.tensor([ids])).logits[0]
    got = score_sequence(runner_model, ids, slot=slot)
    assert (ref - base_ref).abs().max() > 0.1  # the adapter really changes the output
    torch.testing.assert_close(got, ref, **LOGITS_TOL)
    torch.testing.assert_close(score_sequence(runner_model, ids, slot=-1), base_ref, **LOGITS_TOL)


def _peft_greedy(peft_model, tokenizer, prompt: str) -> list[int]:
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                  min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def engine_with_adapters(peft_adapters):
    from loraplex.server.engine.config import EngineConfig
    from loraplex.server.engine.engine import Engine

    engine = Engine.from_config(EngineConfig(model_dir=TINY, kv_cache_tokens=4096, max_batch_tokens=64, adapter_slots=8, max_rank=32))
    for kind, (path, _) in peft_adapters.items():
        engine.adapters.add(kind, path)
    engine.start()
    yield engine
    engine.shutdown(1.0)


def _generate(engine, prompt, adapter):
    req = GenerationRequest(engine.tokenizer.encode(prompt), SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True), adapter_id=adapter)
    return engine.submit(req)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_tokens_match_peft(kind, peft_adapters, engine_with_adapters):
    _, peft_model = peft_adapters[kind]
    engine = engine_with_adapters
    for prompt in PROMPTS:
        expected = _peft_greedy(peft_model, engine.tokenizer, prompt)
        got = list(_generate(engine, prompt, kind).result(timeout=60).token_ids)
        assert got == expected, f"{kind} on {prompt!r}"


def test_mixed_batch_gives_each_request_its_solo_tokens(engine_with_adapters):
    engine = engine_with_adapters
    jobs = [(p, a) for a in (*KINDS, None) for p in PROMPTS[:2]] + [(PROMPTS[2], "dora"), (PROMPTS[2], None)]
    solo = {job: list(_generate(engine, *job).result(timeout=60).token_ids) for job in jobs}
    first, later = jobs[::2], jobs[1::2]
    handles = {job: _generate(engine, *job) for job in first}
    next(handles[first[0]].events(timeout=60))  # the first wave is decoding
    time.sleep(0.05)
    handles.update({job: _generate(engine, *job) for job in later})  # joins mid-generation
    mixed = {job: list(h.result(timeout=120).token_ids) for job, h in handles.items()}
    assert mixed == solo
    assert engine.stats().adapter_pins == 0 and engine.blocks.num_used == 0
