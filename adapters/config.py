"""adapter_config.json, parsed and validated into one frozen dataclass.

PEFT writes every field of its config class; we sort each field of each supported
`peft_type` into: used (parsed below), inert (training-only or informational: ignored,
as PEFT ignores them at inference), or must-keep-its-default (a feature the server does
not implement: LoRA bias, layer replication, trainable tokens, ...). A field we do not
know is ignored when it holds a null/false/empty value and refused otherwise, so a
future PEFT feature is never silently dropped.

Target matching (`targets`), `rank_pattern`/`alpha_pattern` lookups (`rank_for`,
`alpha_for`) follow PEFT 0.21 (`check_target_module_exists`, `get_pattern_key`) on the
module names of a Hugging Face Llama-family model (`model.layers.{i}.self_attn.q_proj`).
Every regex of a config is compiled (in the form PEFT wraps it in) when the config is
built, and matched through its PatternMatcher (patterns.py): time-bounded, GIL released.
This module knows nothing of tensors; max-rank limits are checked by `parse_adapter_config`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from .errors import AdapterError
from .form import TARGET_MODULES, ModuleKey
from .patterns import PatternMatcher
from .strict_json import strict_json

# Where each target module sits in a Llama-family decoder layer.
MODULE_PARENT = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}  # fmt: skip


def peft_module_name(layer: int, name: str) -> str:
    """The module's name in the HF model, as PEFT matches it: model.layers.0.self_attn.q_proj."""
    return f"model.layers.{layer}.{MODULE_PARENT[name]}.{name}"


def _other_module_names(num_layers: int) -> list[str]:
    """Named modules of a Llama-family HF model that adapters may not target."""
    names = ["", "model", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head"]
    for i in range(num_layers):
        p = f"model.layers.{i}"
        names += [p, f"{p}.self_attn", f"{p}.mlp", f"{p}.mlp.act_fn", f"{p}.input_layernorm",
                  f"{p}.post_attention_layernorm"]  # fmt: skip
    return names


# Base-model-modifying initialisations: the adapter only works on a base PEFT rewrote.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _base_modifying_init_message(init: str) -> str:
    """Why an adapter with a base-rewriting init_lora_weights is refused, and what to do instead."""
    if init.lower().startswith("loftq"):
        return (
            f"init_lora_weights={init!r}: this initialisation rewrites the base model's weights (LoftQ quantizes "
            "them anew, the adapter correcting that quantization's error), so the adapter only works on the "
            "quantized base LoftQ saved with it, not on the server's NF4 quantization of the original weights, "
            "and PEFT cannot convert it to a plain LoRA; serve it with its own quantized base, or train a LoRA "
            "on this one"
        )
    return (
        f"init_lora_weights={init!r}: this initialisation rewrites the base model's weights (W - s·B·A of the "
        "initial adapter), so the adapter only works on that rewritten base; convert it to a plain LoRA that works "
        "on the original base: save the adapter as initialised, before training, to a directory INIT, then save "
        "the trained one with PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=INIT), which "
        "writes a rank-2r LoRA"
    )

_COMMON_INERT = {
    "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "fan_in_fan_out",  # PEFT resets fan_in_fan_out to False for nn.Linear targets
}  # fmt: skip
_LORA_INERT = _COMMON_INERT | {
    "lora_dropout", "megatron_core", "qalora_group_size", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "runtime_config", "ensure_weight_tying",
}  # fmt: skip
# Features the server does not implement: the value must be one of these. field -> (allowed, why)
_LORA_FIXED: dict[str, tuple[tuple, str]] = {
    "lora_bias": ((False,), "LoRA with a trainable bias (lora_bias) is not supported"),
    "use_qalora": ((False,), "QALoRA is not supported"),
    "layer_replication": ((None, []), "layer_replication changes the base model's layers"),
    "target_parameters": ((None, []), "adapters on nn.Parameters (target_parameters) are not supported"),
    "trainable_token_indices": ((None, [], {}), "trainable tokens change the embeddings"),
    "alora_invocation_tokens": ((None, []), "activated LoRA (alora_invocation_tokens) is not supported"),
    "arrow_config": ((None,), "Arrow routing is not supported"),
    "velora_config": ((None,), "VeLoRA is not supported"),
    "monteclora_config": ((None,), "MonteCLoRA is not supported"),
    "use_bdlora": ((None, False), "block-diagonal LoRA is not supported"),
    "kasa_config": ((None,), "KaSA is not supported"),
    "megatron_config": ((None,), "Megatron-parallel LoRA layers are not supported"),
}


@dataclass(frozen=True)
class _TypeSpec:
    used: frozenset[str]  # parsed into AdapterConfig
    inert: frozenset[str]  # ignored
    fixed: Mapping[str, tuple[tuple, str]]  # must hold one of the allowed values
    renamed: Mapping[str, str]  # JSON field -> AdapterConfig field
    rank_field: str  # the field holding the rank every module starts from
    rank_checked_at_parse: bool  # False where the final rank is only known after conversion
    rank_power: int = 1  # the served rank is rank_field ** rank_power (LoHa: r·r)
    rank_note: str = ""  # how the served rank follows from r, for the max-rank message ({r}: the largest r)


_LORA_USED = {
    "peft_type", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "bias", "modules_to_save", "init_lora_weights", "r", "lora_alpha", "use_rslora", "use_dora",
    "rank_pattern", "alpha_pattern",
}  # fmt: skip

# LoHa and LoKr (PEFT's LycorisConfig): alpha (renamed to lora_alpha), r, rank_pattern, alpha_pattern.
_LYCORIS_USED = {
    "peft_type", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "modules_to_save", "r", "alpha", "rank_pattern", "alpha_pattern",
}  # fmt: skip
# rank_dropout, module_dropout (and LoKr's rank_dropout_scale) act in training only; init_weights only
# initialises. use_effective_conv2d only changes convolutions (PEFT ignores it on nn.Linear, the only
# modules an adapter may target here); a CP/Tucker tensor (hada_t1/t2, lokr_t2) is refused by the types.
_LYCORIS_INERT = _COMMON_INERT | {"rank_dropout", "module_dropout", "init_weights", "use_effective_conv2d"}

SPECS: Mapping[str, _TypeSpec] = MappingProxyType({
    "LORA": _TypeSpec(
        used=frozenset(_LORA_USED), inert=frozenset(_LORA_INERT), fixed=_LORA_FIXED, renamed={},
        rank_field="r", rank_checked_at_parse=True,
    ),
    "VERA": _TypeSpec(
        used=frozenset({"peft_type", "target_modules", "layers_to_transform", "layers_pattern", "bias",
                        "modules_to_save", "r", "projection_prng_key", "save_projection", "d_initial"}),
        inert=frozenset(_COMMON_INERT | {"vera_dropout", "init_weights"}),
        fixed={"use_dora": ((False, None), "DoRA is a LoRA variant; VeRA adapters cannot use it")},
        renamed={}, rank_field="r", rank_checked_at_parse=True,
    ),
    "ADALORA": _TypeSpec(
        used=frozenset((_LORA_USED - {"r", "use_dora", "use_rslora", "alpha_pattern"})
                       | {"init_r", "target_r"}),
        # PEFT's AdaLoRA ignores r, use_rslora and alpha_pattern (scaling is lora_alpha / ranknum).
        inert=frozenset(_LORA_INERT | {"r", "use_rslora", "alpha_pattern", "tinit", "tfinal", "deltaT",
                                       "beta1", "beta2", "orth_reg_weight", "total_step"}),
        fixed={**_LORA_FIXED, "use_dora": ((False,), "AdaLoRA does not support DoRA")},
        renamed={"rank_pattern": "rank_masks"}, rank_field="init_r", rank_checked_at_parse=False,
    ),
    "LOHA": _TypeSpec(
        used=frozenset(_LYCORIS_USED), inert=frozenset(_LYCORIS_INERT), fixed={}, renamed={"alpha": "lora_alpha"},
        rank_field="r", rank_checked_at_parse=True, rank_power=2,
        rank_note=" (LoHa serves at effective rank r·r = {r}·{r}: the Hadamard product of two rank-{r} products)",
    ),
    "LOKR": _TypeSpec(
        used=frozenset(_LYCORIS_USED | {"decompose_both", "decompose_factor"}),
        inert=frozenset(_LYCORIS_INERT | {"rank_dropout_scale"}), fixed={}, renamed={"alpha": "lora_alpha"},
        rank_field="r", rank_checked_at_parse=False,  # rank(W1)·rank(W2) needs the base's shapes
    ),
})  # fmt: skip


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    if not (_is_int(v) or isinstance(v, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int past float's range
        return False


# How PEFT 0.21 wraps the patterns of a config before matching them (prefix, suffix).
_PATTERN_KEY_WRAP = (r"(.*\.)?(", r")$")  # get_pattern_key: re.match(rf"(.*\.)?({p})$", key)
_LAYERS_WRAP = (r"(?:^|.*?\.)", r"\.(?P<idx>\d+)\.")  # layer index after a layers_pattern
_DEFAULT_LAYERS = r".*?\.[^.]*\.(?P<idx>\d+)\."  # layer index without one (ours: a trusted pattern)


def _str_list(name: str, v: object, *, allow_regex: bool) -> tuple[str, ...] | str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v if allow_regex else (v,)  # a regex: compiled by AdapterConfig
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return tuple(v)
    raise AdapterError(f"adapter_config.json: {name} must be a list of strings or a string, not {v!r}")


@dataclass(frozen=True)
class AdapterConfig:
    """A validated adapter_config.json. Field names are PEFT's."""

    peft_type: str  # "LORA" | "VERA" | "ADALORA" | "LOHA" | "LOKR"
    target_modules: tuple[str, ...] | str  # module names (suffix match) or one regex (full match)
    exclude_modules: tuple[str, ...] | str | None = None
    layers_to_transform: tuple[int, ...] | int | None = None
    layers_pattern: tuple[str, ...] | None = None
    bias: str = "none"
    modules_to_save: tuple[str, ...] | None = None
    init_lora_weights: bool | str = True
    r: int = 8  # LoRA / VeRA / LoHa / LoKr rank
    lora_alpha: float = 8  # LoHa / LoKr: their "alpha"
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)  # LoRA: pattern -> r
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)  # LoRA: pattern -> alpha
    projection_prng_key: int = 0  # VeRA
    save_projection: bool = True  # VeRA
    d_initial: float = 0.1  # VeRA
    init_r: int = 12  # AdaLoRA: rank before pruning (= ranknum)
    target_r: int = 8  # AdaLoRA
    decompose_both: bool = False  # LoKr: W1 factored too (when r < max(W1's dims) / 2)
    decompose_factor: int = -1  # LoKr: factorization() of in/out dims (-1: near the square root)
    rank_masks: Mapping[ModuleKey, tuple[bool, ...]] | None = None  # AdaLoRA's saved rank_pattern: kept rows [init_r]
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)  # the JSON as read
    _patterns: PatternMatcher = field(init=False, compare=False, repr=False)  # this config's regexes, bounded

    def __post_init__(self) -> None:
        spec = SPECS.get(self.peft_type) if isinstance(self.peft_type, str) else None
        if spec is None:
            raise AdapterError(
                f"adapter_config.json: peft_type {self.peft_type!r} is not supported (supported: {', '.join(SPECS)})"
            )
        err = lambda msg: AdapterError(f"adapter_config.json: {msg}")  # noqa: E731
        if self.bias != "none":
            raise err(f"bias={self.bias!r} is not supported (only 'none'): bias weights are not served")
        if self.modules_to_save:
            raise err(f"modules_to_save={list(self.modules_to_save)} is not supported: only low-rank deltas are served")
        if not self.target_modules:
            raise err("target_modules is missing or empty")
        if not isinstance(self.target_modules, str):
            for t in self.target_modules:
                if t.rsplit(".", 1)[-1] not in TARGET_MODULES:
                    raise err(f"target module {t!r} is not one of {', '.join(TARGET_MODULES)}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise err("layers_to_transform cannot be used when target_modules is a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            raise err("layers_pattern needs layers_to_transform")
        ltt = self.layers_to_transform
        if ltt is not None and not (
            (_is_int(ltt) and ltt >= 0) or (isinstance(ltt, tuple) and all(_is_int(i) and i >= 0 for i in ltt))
        ):
            raise err(f"layers_to_transform must be a layer index or a list of them, not {ltt!r}")
        if not isinstance(self.init_lora_weights, (bool, str)):
            raise err(f"init_lora_weights={self.init_lora_weights!r} is not a bool or a string")
        if isinstance(self.init_lora_weights, str) and self.init_lora_weights.lower().startswith(_BASE_MODIFYING_INITS):
            raise err(_base_modifying_init_message(self.init_lora_weights))
        for name in ("use_rslora", "use_dora", "save_projection", "decompose_both"):
            if not isinstance(getattr(self, name), bool):
                raise err(f"{name} must be true or false, not {getattr(self, name)!r}")
        rank = getattr(self, spec.rank_field)
        if not _is_int(rank) or rank < 1:
            raise err(f"{spec.rank_field} must be a positive integer, not {rank!r}")
        if not _is_number(self.lora_alpha):
            alpha_name = next((k for k, v in spec.renamed.items() if v == "lora_alpha"), "lora_alpha")  # LoHa/LoKr: alpha
            raise err(f"{alpha_name} must be a finite number, not {self.lora_alpha!r}")
        for pattern, value in self.rank_pattern.items():
            if not _is_int(value) or value < 1:
                raise err(f"rank_pattern[{pattern!r}] must be a positive integer, not {value!r}")
        for pattern, value in self.alpha_pattern.items():
            if not _is_number(value):
                raise err(f"alpha_pattern[{pattern!r}] must be a finite number, not {value!r}")
        object.__setattr__(self, "_patterns", PatternMatcher())
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), str):
                self._patterns.compile(getattr(self, name), name)
        for name in ("rank_pattern", "alpha_pattern"):
            for pattern in getattr(self, name):
                self._patterns.compile(pattern, f"{name} key", _PATTERN_KEY_WRAP)
        for pattern in self.layers_pattern or ():
            self._patterns.compile(pattern, "layers_pattern", _LAYERS_WRAP)
        if not _is_int(self.decompose_factor) or not -(2**31) <= self.decompose_factor < 2**31:
            raise err(f"decompose_factor must be an integer (-1: automatic), not {self.decompose_factor!r}")
        if not _is_int(self.projection_prng_key) or not -(2**63) <= self.projection_prng_key < 2**64:
            raise err(f"projection_prng_key must be a 64-bit integer, not {self.projection_prng_key!r}")
        for key, mask in (self.rank_masks or {}).items():
            if len(mask) != self.init_r:
                raise err(f"rank_pattern for layer {key[0]} {key[1]} has {len(mask)} entries, expected init_r={self.init_r}")

    # -- PEFT semantics -------------------------------------------------------------------

    def targets(self, key: str) -> bool:
        """Whether PEFT would adapt the module named `key` (check_target_module_exists)."""
        match = self._patterns.match
        ex = self.exclude_modules
        if ex:
            if isinstance(ex, str):
                if match("fullmatch", ex, key, "exclude_modules"):
                    return False
            elif key in ex or any(key.endswith(f".{e}") for e in ex):
                return False
        if isinstance(self.target_modules, str):
            return match("fullmatch", self.target_modules, key, "target_modules") is not None
        if key in self.target_modules:
            return True
        if not any(key.endswith(f".{t}") for t in self.target_modules):
            return False
        ltt = self.layers_to_transform
        if ltt is None or (isinstance(ltt, tuple) and len(ltt) == 0):
            return True
        found = None
        if not self.layers_pattern:
            found = match("match", _DEFAULT_LAYERS, key, "the layer index pattern")
        else:
            for pattern in self.layers_pattern:
                found = match("match", pattern, key, "layers_pattern", _LAYERS_WRAP)
                if found is not None:
                    break
        if found is None:
            return False
        idx = int(found.group("idx"))  # of one of our module names: a few ASCII digits
        return idx == ltt if _is_int(ltt) else idx in ltt

    def targeted_modules(self, num_layers: int) -> list[ModuleKey]:
        """The (layer, name) PEFT adapts in a `num_layers` Llama-family model; refuses a
        target pattern that reaches any other module (embeddings, lm_head, norms, ...)."""
        for other in _other_module_names(num_layers):
            if self.targets(other):
                raise AdapterError(
                    f"adapter_config.json: target_modules {self._targets_repr()} matches {other or '<root>'!r}, "
                    f"which is not one of {', '.join(TARGET_MODULES)}"
                )
        return [
            (i, n) for i in range(num_layers) for n in TARGET_MODULES if self.targets(peft_module_name(i, n))
        ]

    def _targets_repr(self) -> str:
        t = self.target_modules
        return repr(t) if isinstance(t, str) else repr(list(t))

    def _pattern_key(self, patterns: Mapping[str, Any], key: str, name: str) -> str | None:
        for p in patterns:  # first match wins, in file order (get_pattern_key)
            if self._patterns.match("match", p, key, f"{name} key", _PATTERN_KEY_WRAP):
                return p
        return None

    def rank_for(self, key: str) -> int:
        p = self._pattern_key(self.rank_pattern, key, "rank_pattern")
        return self.r if p is None else self.rank_pattern[p]

    def alpha_for(self, key: str) -> float:
        p = self._pattern_key(self.alpha_pattern, key, "alpha_pattern")
        return self.lora_alpha if p is None else self.alpha_pattern[p]

    @property
    def declared_max_rank(self) -> int | None:
        """The largest rank the config itself fixes (None where only the tensors tell)."""
        spec = SPECS[self.peft_type]
        if not spec.rank_checked_at_parse:
            return None
        return self.declared_max_r ** spec.rank_power

    @property
    def declared_max_r(self) -> int:
        """The largest r (rank field or rank_pattern value) of the config."""
        return max([getattr(self, SPECS[self.peft_type].rank_field), *self.rank_pattern.values()])


def _convert_field(name: str, v: Any) -> Any:
    if name in ("target_modules", "exclude_modules"):
        return _str_list(name, v, allow_regex=True)
    if name in ("modules_to_save", "layers_pattern"):
        return _str_list(name, v, allow_regex=False)
    if name == "layers_to_transform" and isinstance(v, list):
        return tuple(v)
    if name in ("rank_pattern", "alpha_pattern"):
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise AdapterError(f"adapter_config.json: {name} must be an object, not {v!r}")
        return dict(v)
    if name == "rank_masks":
        return None if v is None else _rank_masks(v)
    return v


# An AdaLoRA rank_pattern key as PEFT saves it: "model.layers.0.self_attn.q_proj.lora_E" (the adapter
# name is stripped at save; tolerate it, and a "base_model.model." prefix).
_MASK_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(0|[1-9][0-9]{0,8})\.(self_attn|mlp)\.(\w+)\.lora_E(?:\.[^.]+)?$"
)


def _rank_masks(v: Any) -> dict[ModuleKey, tuple[bool, ...]]:
    """AdaLoRA's rank_pattern {lora_E name: [kept row, ...]} by (layer, name)."""
    if not isinstance(v, dict):
        raise AdapterError(f"adapter_config.json: AdaLoRA rank_pattern must be an object, not {v!r}")
    out: dict[ModuleKey, tuple[bool, ...]] = {}
    for name, mask in v.items():
        m = _MASK_KEY.match(name)
        if m is None or MODULE_PARENT.get(m.group(3)) != m.group(2):
            raise AdapterError(f"adapter_config.json: rank_pattern key {name!r} does not name a target module's lora_E")
        key = (int(m.group(1)), m.group(3))
        if key in out:
            raise AdapterError(f"adapter_config.json: rank_pattern names layer {key[0]} {key[1]} twice")
        if not isinstance(mask, list) or not all(isinstance(b, bool) for b in mask):
            raise AdapterError(f"adapter_config.json: rank_pattern[{name!r}] must be a list of true/false")
        out[key] = tuple(mask)
    return out


def parse_adapter_config(raw: Any, *, max_rank: int | None = None) -> AdapterConfig:
    """AdapterConfig from the decoded JSON object; AdapterError on anything not served."""
    if not isinstance(raw, dict):
        raise AdapterError(f"adapter_config.json must hold a JSON object, not a {type(raw).__name__}")
    peft_type = raw.get("peft_type")
    spec = SPECS.get(peft_type) if isinstance(peft_type, str) else None
    if spec is None:
        raise AdapterError(f"adapter_config.json: peft_type {peft_type!r} is not supported (supported: {', '.join(SPECS)})")
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in spec.used or key in spec.renamed:
            name = spec.renamed.get(key, key)
            kwargs[name] = _convert_field(name, value)
        elif key in spec.inert:
            continue
        elif key in spec.fixed:
            allowed, why = spec.fixed[key]
            if not any(value == a and type(value) is type(a) for a in allowed):
                raise AdapterError(f"adapter_config.json: {key}={value!r} is not supported for {peft_type}: {why}")
        elif value not in (None, False, "", [], {}):
            raise AdapterError(
                f"adapter_config.json: field {key}={value!r} is not a {peft_type} field loraplex knows; "
                "refusing rather than ignoring it"
            )
    if "target_modules" not in kwargs:
        raise AdapterError("adapter_config.json: target_modules is missing")
    config = AdapterConfig(**kwargs, raw=dict(raw))
    declared = config.declared_max_rank
    if max_rank is not None and declared is not None and declared > max_rank:
        note = SPECS[config.peft_type].rank_note.format(r=config.declared_max_r)
        raise AdapterError(f"adapter_config.json: rank {declared} is over the server's max rank {max_rank}{note}; "
                           f"raise --max-rank to at least {declared} to serve it")
    return config


def decode_config_json(data: bytes) -> Any:
    """The JSON value of adapter_config.json bytes (duplicate keys and NaN refused)."""
    return strict_json(data, "adapter_config.json")
