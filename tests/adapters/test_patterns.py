"""Regexes of adapter configs (adapters/patterns.py): PEFT's `re` semantics, refused
with an AdapterError when malformed or too slow to match, and matched without the GIL."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
import torch

from loraplex.adapters.config import parse_adapter_config
from loraplex.adapters.errors import AdapterError
from loraplex.adapters.loader import load_adapter_dir
from loraplex.adapters.patterns import MATCH_BUDGET_S, PatternMatcher

SLOW = r"(?:.|\.|[a-z]|\w)*(?!)"  # never matches; exponential backtracking on any name of 20+ characters
LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def _config(**fields):
    return parse_adapter_config(LORA | fields)


def _use(config, num_layers: int = 2) -> None:
    """What conversion asks of a config: its targets, then r and alpha per target."""
    from loraplex.adapters.config import peft_module_name

    for key in config.targeted_modules(num_layers):
        config.rank_for(peft_module_name(*key)), config.alpha_for(peft_module_name(*key))


SLOW_FIELDS = {
    "target_modules": dict(target_modules=SLOW),
    "exclude_modules": dict(exclude_modules=SLOW),
    "rank_pattern key": dict(rank_pattern={SLOW: 2}),
    "alpha_pattern key": dict(alpha_pattern={SLOW: 2}),
    "layers_pattern": dict(layers_pattern=[SLOW], layers_to_transform=[0]),
}


@pytest.mark.parametrize("field", SLOW_FIELDS)
def test_a_catastrophic_pattern_is_refused_in_bounded_time(field):
    config = _config(**SLOW_FIELDS[field])
    wall, cpu = time.perf_counter(), time.thread_time()
    with pytest.raises(AdapterError, match=rf"{field} .* took longer than 100 ms to match .*; simplify the pattern"):
        _use(config)
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    assert cpu < 4 * MATCH_BUDGET_S and wall < 3.0, (cpu, wall)  # regex counts CPU time; this host may be loaded


def test_matching_does_not_hold_the_gil():
    """While one thread matches a catastrophic pattern, another keeps running."""
    gaps, stop = [], threading.Event()

    def busy() -> None:
        last, worst = time.perf_counter(), 0.0
        while not stop.is_set():
            now = time.perf_counter()
            worst, last = max(worst, now - last), now
        gaps.append(worst)

    config = _config(target_modules=SLOW)
    thread = threading.Thread(target=busy)
    thread.start()
    try:
        time.sleep(0.02)
        with pytest.raises(AdapterError, match="took longer than"):
            _use(config)
    finally:
        stop.set()
        thread.join()
    assert gaps[0] < 0.1, gaps


@pytest.mark.parametrize("pattern", [r"model\.layers([\w.]+)+X", r"(.+)+X"])
def test_the_issue_patterns_are_quick(pattern):
    """Under `re` these take 16 s and hours; they match nothing, as under PEFT."""
    t0 = time.perf_counter()
    assert _config(target_modules=pattern).targeted_modules(32) == []
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(layers_pattern=["("], layers_to_transform=[0]), r"layers_pattern '\(' is not a valid regular expression"),
        (dict(rank_pattern={"(?i)q_proj": 2}), r"rank_pattern key '\(\?i\)q_proj' is not a valid regular expression \(as PEFT matches it"),
        (dict(alpha_pattern={"[q_proj": 2}), r"alpha_pattern key '\[q_proj' is not a valid"),
        (dict(target_modules="a{4294967296}"), r"target_modules 'a\{4294967296\}' is not a valid"),
        (dict(exclude_modules="(" * 3000 + ")" * 3000), r"exclude_modules '\(\(\(.* is not a valid"),
        (dict(layers_pattern=["(?P<idx>layers)"], layers_to_transform=[0]), r"layers_pattern .* is not a valid"),
        (dict(lora_alpha=10**400), r"lora_alpha must be a finite number"),
        (dict(alpha_pattern={"q_proj": -(10**400)}), r"alpha_pattern\['q_proj'\] must be a finite number"),
    ],
    ids=["layers_pattern (", "(?i) wrapped", "unbalanced", "huge repeat", "deep nesting", "idx group", "huge alpha", "huge alpha_pattern"],
)
def test_malformed_fields_are_adapter_errors(fields, match):
    with pytest.raises(AdapterError, match=match):
        _use(_config(**fields))


def test_a_layer_index_of_thousands_of_digits_is_an_adapter_error(tmp_path, dense_view, kit):
    shapes = {"q_proj": (64, 64)}
    key = f"base_model.model.model.layers.{'7' * 5000}.self_attn.q_proj"
    tensors = {f"{key}.lora_A.weight": torch.randn(4, shapes["q_proj"][1]), f"{key}.lora_B.weight": torch.randn(64, 4)}
    kit.write_adapter(tmp_path / "a", LORA | {"target_modules": ["q_proj"]}, tensors)
    with pytest.raises(AdapterError, match="is not a LORA adapter weight loraplex understands"):
        load_adapter_dir(tmp_path / "a", dense_view, max_rank=16, dtype=torch.float32)
    adalora = {"peft_type": "ADALORA", "init_r": 4, "target_modules": ["q_proj"],
               "rank_pattern": {f"model.layers.{'1' * 5000}.self_attn.q_proj.lora_E": [True] * 4}}  # fmt: skip
    with pytest.raises(AdapterError, match="does not name a target module's lora_E"):
        parse_adapter_config(adalora)


def test_hundreds_of_per_module_rank_keys_stay_under_the_budget():
    """A resized LoRA may name every module of an 80-layer base in rank_pattern and alpha_pattern."""
    from loraplex.adapters.config import peft_module_name

    names = [peft_module_name(i, n) for i in range(80) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")]
    config = _config(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                     rank_pattern={n: 2 + i % 3 for i, n in enumerate(names)}, alpha_pattern={n: 4.0 for n in names},
                     exclude_modules=r"model\.layers\.7[0-9]\..*")  # fmt: skip
    _use(config, num_layers=80)
    assert config.rank_for(names[5]) == 2 + 5 % 3
    assert config._patterns.left > MATCH_BUDGET_S / 2


PATTERNS = [r"q_proj", r".*\.q_proj", r"model\.layers\.[01]\..*", r"(?!model\.layers\.1).*_proj", r"(.)\1*", r"layers",
            r"self_attn\.(q|v)_proj", r"[a-z_]+", r"(?i)MODEL.*", "model.layers.0.self_attn.q_proj"]  # fmt: skip
KEYS = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.norm", "lm_head", "", "mm", "layers"]


@pytest.mark.parametrize("how", ["match", "fullmatch"])
def test_same_answers_as_re(how):
    m = PatternMatcher()
    for p in PATTERNS:
        for k in KEYS:
            got = m.match(how, p, k, "f")
            want = getattr(re, how)(p, k)
            assert (got is None) == (want is None) and (got is None or got.span() == want.span()), (p, k)
            wrapped = m.match("match", p, k, "f", (r"(.*\.)?(", r")$")) if not p.startswith("(?i)") else None
            if wrapped is not None:
                assert re.match(rf"(.*\.)?({p})$", k)


def test_config_json_round_trip_keeps_patterns(tmp_path):
    """The matcher is per config and not part of equality or repr."""
    a, b = _config(target_modules=r".*q_proj"), _config(target_modules=r".*q_proj")
    assert a == b and "PatternMatcher" not in repr(a)
    assert json.loads(json.dumps(dict(a.raw)))["target_modules"] == r".*q_proj"
