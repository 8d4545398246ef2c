"""Per-request mixtures against PEFT: a mixture of LoRA adapters gives the logits and
greedy tokens of PEFT's `add_weighted_adapter(combination_type="cat")` adapter on the
same NF4 base; a mixture of LoRA, VeRA and AdaLoRA those of the NF4 base plus
Σ wᵢ ΔWᵢ with each ΔWᵢ from PEFT's own `get_delta_weight`. In the engine a mixture
batches with single adapters, binds its parts' current versions, and is refused at
submit with a message that says why."""

import time

import pytest
import torch

from loraplex.adapters.loader import load_adapter_dir
from loraplex.adapters.mixture import mix
from loraplex.server.engine.adapter_manager import MIXTURE
from loraplex.server.engine.adapter_pages import AdapterPages
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.engine import Engine
from loraplex.server.engine.errors import InvalidRequest, UnknownAdapter
from loraplex.server.engine.request import GenerationRequest, SamplingParams
from loraplex.server.model.llama import score_sequence
from loraplex.server.model.loader import LoadSpec, load_model
from peft_adapters import TINY, nf4_base, save_peft_adapter

LOGITS_TOL = dict(atol=1e-4, rtol=1e-4)
PROMPTS = ["the cat", "our team builds the garden every"]
NEW_TOKENS = 12
IDS = [1] + [b + 3 for b in b"the teacher paints a blue boat"]
# name -> (PEFT kind, seed)
PARTS = {"lora": ("lora", 0), "lora2": ("lora", 1), "rslora": ("rslora", 2), "vera": ("vera", 3), "adalora": ("adalora", 4),
         "dora": ("dora", 5)}  # fmt: skip
CAT = (("lora", 0.8), ("lora2", -0.5), ("rslora", 1.2))  # ranks 8 + 8 + 16 = 32 on q, v, down
FAMILIES = (("lora", 0.6), ("vera", -0.9), ("adalora", 1.5))  # ranks 8 + 16 + 8 on q


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return {name: (root / name, save_peft_adapter(kind, root / name, seed=seed)) for name, (kind, seed) in PARTS.items()}


@pytest.fixture(scope="module")
def peft_cat(adapter_dirs):
    """PEFT's own mixture of CAT: the oracle."""
    from peft import PeftModel

    (first, _), *rest = CAT
    model = PeftModel.from_pretrained(nf4_base(), str(adapter_dirs[first][0]), adapter_name=first)
    for name, _ in rest:
        model.load_adapter(str(adapter_dirs[name][0]), adapter_name=name)
    model.add_weighted_adapter([n for n, _ in CAT], [w for _, w in CAT], "mix", combination_type="cat")
    model.set_adapter("mix")
    return model.eval()


@pytest.fixture(scope="module")
def peft_sum(adapter_dirs):
    """The NF4 base with Σ wᵢ ΔWᵢ added to each target module by a hook, ΔWᵢ from PEFT."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    deltas: dict[str, torch.Tensor] = {}
    for name, w in FAMILIES:
        peft_model = adapter_dirs[name][1]
        for path, module in peft_model.named_modules():
            if isinstance(module, BaseTunerLayer):  # ΔWᵢ by PEFT's own forward, on the identity
                eye = torch.eye(module.base_layer.in_features)
                with torch.no_grad():
                    d = (module(eye) - module.base_layer(eye)).t() * w  # [out, in]
                key = path[path.index("layers."):]  # base_model.model.model.layers.0.self_attn.q_proj
                deltas[key] = deltas.get(key, 0) + d
    base, hooked = nf4_base(), []
    for path, module in base.model.named_modules():
        if path in deltas:
            hooked.append(path)
            module.register_forward_hook(lambda m, args, out, d=deltas[path]: out + args[0] @ d.t())
    assert len(hooked) == len(deltas) >= 8
    return base


@pytest.fixture(scope="module")
def runner():
    model = load_model(TINY, LoadSpec())
    return model, AdapterPages(model, 2, 32)


def _mixed_weights(adapter_dirs, model, parts):
    return mix([(n, load_adapter_dir(adapter_dirs[n][0], model, max_rank=32, dtype=torch.float32), w) for n, w in parts], 32)


@pytest.mark.parametrize("parts, oracle", [(CAT, "peft_cat"), (FAMILIES, "peft_sum")])
def test_mixture_logits_match_peft(parts, oracle, adapter_dirs, runner, request):
    model, pages = runner
    weights = _mixed_weights(adapter_dirs, model, parts)
    pages.write(0, weights)
    ref_model = request.getfixturevalue(oracle)
    with torch.no_grad():
        ref = ref_model(torch.tensor([IDS])).logits[0]
    got = score_sequence(model, IDS, slot=0)
    assert (ref - score_sequence(model, IDS, slot=-1)).abs().max() > 0.1  # the mixture changes the output
    torch.testing.assert_close(got, ref, **LOGITS_TOL)


@pytest.fixture(scope="module")
def engine(adapter_dirs):
    engine = Engine.from_config(EngineConfig(model_dir=TINY, kv_cache_tokens=4096, max_batch_tokens=64, adapter_slots=6, max_rank=32))
    for name, (path, _) in adapter_dirs.items():
        engine.adapters.add(name, path)
    engine.start()
    yield engine
    engine.shutdown(1.0)


def _submit(engine, prompt, adapter=None, adapters=()):
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    return engine.submit(GenerationRequest(engine.tokenizer.encode(prompt), params, adapter_id=adapter, adapters=adapters))


def _tokens(engine, prompt, adapter=None, adapters=()):
    return list(_submit(engine, prompt, adapter, adapters).result(timeout=60).token_ids)


def _peft_greedy(model, tokenizer, prompt):
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)  # fmt: skip
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("parts, oracle", [(CAT, "peft_cat"), (FAMILIES, "peft_sum")])
def test_mixture_greedy_tokens_match_peft(parts, oracle, engine, request):
    ref_model = request.getfixturevalue(oracle)
    for prompt in PROMPTS:
        assert _tokens(engine, prompt, adapters=parts) == _peft_greedy(ref_model, engine.tokenizer, prompt), prompt
    reordered = tuple(reversed(parts))  # the same mixture: one key, one slot
    assert engine.adapters.mixture_key(reordered) == engine.adapters.mixture_key(parts)
    assert engine.adapters.mixture_key(parts)[0] == MIXTURE


def test_mixture_in_a_batch_gives_its_solo_tokens(engine):
    jobs = [(p, None, CAT) for p in PROMPTS] + [(p, "lora", ()) for p in PROMPTS] + [(PROMPTS[0], "vera", ()),
            (PROMPTS[1], None, FAMILIES), (PROMPTS[0], None, ())]  # fmt: skip
    solo = {job: _tokens(engine, *job) for job in jobs}
    first, later = jobs[::2], jobs[1::2]
    handles = {job: _submit(engine, *job) for job in first}
    next(handles[first[0]].events(timeout=60))
    time.sleep(0.05)
    handles.update({job: _submit(engine, *job) for job in later})
    assert {job: list(h.result(timeout=120).token_ids) for job, h in handles.items()} == solo
    assert engine.stats().adapter_pins == 0


def test_replacing_a_part_serves_its_new_version(engine, adapter_dirs):
    engine.adapters.add("swap", adapter_dirs["lora"][0])
    before = _tokens(engine, PROMPTS[1], adapters=(("swap", 1.0), ("vera", 0.5)))
    old_key = engine.adapters.mixture_key((("swap", 1.0), ("vera", 0.5)))
    assert old_key in engine.adapters.host
    engine.adapters.add("swap", adapter_dirs["lora2"][0], replace=True)
    assert old_key not in engine.adapters.host  # retired with its part
    after = _tokens(engine, PROMPTS[1], adapters=(("swap", 1.0), ("vera", 0.5)))
    assert after == _tokens(engine, PROMPTS[1], adapters=(("lora2", 1.0), ("vera", 0.5))) != before
    deadline = time.monotonic() + 10
    while old_key in engine.adapters.device.resident and time.monotonic() < deadline:
        time.sleep(0.01)
    assert old_key not in engine.adapters.device.resident
    engine.adapters.remove("swap")
    with pytest.raises(UnknownAdapter, match="adapter 'swap' not found"):
        _submit(engine, PROMPTS[0], adapters=(("swap", 1.0), ("vera", 0.5)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(adapters=(("lora", 1.0), ("dora", 0.5))), "adapter 'dora' is DoRA, which cannot be mixed"),
    (dict(adapters=(("lora", 1.0), ("lora2", 1.0), ("rslora", 1.0), ("vera", 1.0))),
     "the mixture has rank up to 48 in q_proj (the parts' ranks add up), over --max-rank 32 (raise --max-rank"),
    (dict(adapters=tuple((f"a{i}", 1.0) for i in range(9))), "a mixture has at most 8 adapters, got 9"),
    (dict(adapters=(("lora", float("nan")),)), "the weight of adapter 'lora' in the mixture must be a finite number"),
    (dict(adapters=(("lora", 1.0), ("lora", 2.0))), "adapter 'lora' appears twice in the mixture"),
    (dict(adapter_id="lora", adapters=(("lora2", 1.0),)), "adapter_id and adapters are exclusive"),
    (dict(adapters=(("../x", 1.0),)), "adapter id '../x' is malformed"),
])  # fmt: skip
def test_refused_at_submit(kwargs, message, engine):
    with pytest.raises(InvalidRequest) as e:
        engine.submit(GenerationRequest([5, 6, 7], SamplingParams(max_new_tokens=2), **kwargs))
    assert message in str(e.value)


def test_unknown_part_is_not_found(engine):
    with pytest.raises(UnknownAdapter, match="adapter 'nope' not found"):
        _submit(engine, PROMPTS[0], adapters=(("lora", 1.0), ("nope", 0.5)))
