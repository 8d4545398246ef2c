"""Everything load_adapter_dir refuses, each with a message that names the problem."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, VeraConfig
from safetensors.torch import load_file, save_file

from loraplex.adapters.config import parse_adapter_config
from loraplex.adapters.errors import AdapterError, AdapterNotFound, AdapterTooLarge
from loraplex.adapters.loader import load_adapter_dir

PREFIX = "base_model.model.model.layers"
Q0 = f"{PREFIX}.0.self_attn.q_proj"


@pytest.fixture
def adapter(tmp_path, lora_dir):
    """A fresh copy of a valid PEFT LoRA adapter (r=4 on q_proj and down_proj, 2 layers)."""
    d = tmp_path / "adapter"
    shutil.copytree(lora_dir, d)
    return d


@pytest.fixture
def load(dense_view):
    def load(d, max_rank=16, **kw):
        return load_adapter_dir(d, dense_view, max_rank=max_rank, dtype=torch.float32, **kw)

    return load


def edit_config(d, **changes):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def edit_tensors(d, fn):
    p = d / "adapter_model.safetensors"
    tensors = load_file(str(p))
    fn(tensors)
    save_file(tensors, str(p))


def refused(load, d, match, exc=AdapterError, **kw):
    with pytest.raises(exc, match=match):
        load(d, **kw)


def test_the_valid_adapter_loads(adapter, load):
    assert len(load(adapter).modules) == 4


# -- files ------------------------------------------------------------------------------


def test_missing_directory(tmp_path, load):
    refused(load, tmp_path / "nope", "does not exist", exc=AdapterNotFound)


def test_missing_config(adapter, load):
    (adapter / "adapter_config.json").unlink()
    refused(load, adapter, "adapter_config.json is missing")


def test_missing_safetensors(adapter, load):
    (adapter / "adapter_model.safetensors").unlink()
    refused(load, adapter, "adapter_model.safetensors is missing")


class _WritesMarker:
    """Unpickling this creates the file `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_payload_works(tmp_path):
    """(The payload below really runs code when unpickled.)"""
    marker = tmp_path / "proof"
    pickle.loads(pickle.dumps(_WritesMarker(marker)))
    assert marker.exists()


@pytest.mark.parametrize("name", ["adapter_model.bin", "adapter_model.pt"])
@pytest.mark.parametrize("keep_safetensors", [False, True])
def test_pickle_weights_refused_never_opened(adapter, load, tmp_path, name, keep_safetensors):
    marker = tmp_path / "unpickled"
    if not keep_safetensors:
        (adapter / "adapter_model.safetensors").unlink()
    (adapter / name).write_bytes(pickle.dumps({"w": _WritesMarker(marker)}))
    refused(load, adapter, f"{name} is a pickle file, which loraplex never opens")
    assert not marker.exists()


def test_symlinked_files_refused(adapter, load, tmp_path):
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        d = tmp_path / f"linked-{name}"
        shutil.copytree(adapter, d)
        (d / name).unlink()
        (d / name).symlink_to(adapter / name)
        refused(load, d, f"{name} is a symlink")


def test_file_size_cap(adapter, load):
    size = os.path.getsize(adapter / "adapter_model.safetensors")
    refused(load, adapter, f"is {size} bytes, over the cap of 1000", exc=AdapterTooLarge, max_bytes=1000)
    assert load(adapter, max_bytes=size).modules


def test_oversized_config(adapter, load):
    edit_config(adapter, padding="x" * (1 << 20))
    refused(load, adapter, "adapter_config.json is .* bytes, over the cap", exc=AdapterTooLarge)


# -- tensors ----------------------------------------------------------------------------


def test_layer_the_base_does_not_have(adapter, load):
    def add(t):
        t[f"{PREFIX}.5.self_attn.q_proj.lora_A.weight"] = torch.ones(4, 64)
        t[f"{PREFIX}.5.self_attn.q_proj.lora_B.weight"] = torch.ones(64, 4)

    edit_tensors(adapter, add)
    refused(load, adapter, r"is for layer 5, but the base model has 2 layers")


@pytest.mark.parametrize("module", ["self_attn.qkv_proj", "mlp.q_proj", "self_attn.rotary_emb"])
def test_module_the_base_does_not_have(adapter, load, module):
    edit_tensors(adapter, lambda t: t.update({f"{PREFIX}.0.{module}.lora_A.weight": torch.ones(4, 64)}))
    refused(load, adapter, rf"is for module {module}, which is not one of the target modules")


def test_shape_mismatch_names_module_and_shapes(adapter, load):
    edit_tensors(adapter, lambda t: t.update({f"{Q0}.lora_A.weight": torch.ones(4, 32)}))
    refused(load, adapter, r"layer 0 q_proj: lora_A.weight has shape \(4, 32\), expected \(4, 64\) \(base module out=64, in=64")


def test_rank_differs_from_config(adapter, load):
    edit_tensors(adapter, lambda t: t.update({f"{Q0}.lora_A.weight": torch.ones(8, 64), f"{Q0}.lora_B.weight": torch.ones(64, 8)}))  # fmt: skip
    refused(load, adapter, r"layer 0 q_proj: lora_A.weight has shape \(8, 64\), expected \(4, 64\) .*r=4 from adapter_config.json")


@pytest.mark.parametrize("which", ["lora_A", "lora_B"])
def test_missing_a_or_b(adapter, load, which):
    edit_tensors(adapter, lambda t: t.pop(f"{PREFIX}.1.mlp.down_proj.{which}.weight"))
    refused(load, adapter, rf"layer 1 down_proj: {which}.weight is missing")


def test_targeted_module_without_weights(adapter, load):
    def drop(t):
        t.pop(f"{PREFIX}.1.mlp.down_proj.lora_A.weight")
        t.pop(f"{PREFIX}.1.mlp.down_proj.lora_B.weight")

    edit_tensors(adapter, drop)
    refused(load, adapter, "layer 1 down_proj is targeted by adapter_config.json, but the file has no weights for it")


def test_weights_for_a_module_the_config_does_not_target(adapter, load):
    def add(t):
        t[f"{PREFIX}.0.self_attn.k_proj.lora_A.weight"] = torch.ones(4, 64)
        t[f"{PREFIX}.0.self_attn.k_proj.lora_B.weight"] = torch.ones(32, 4)

    edit_tensors(adapter, add)
    refused(load, adapter, "layer 0 k_proj has weights, but adapter_config.json target_modules does not target it")


@pytest.mark.parametrize(
    "key, match",
    [
        (f"{Q0}.lora_B.bias", r"'lora_B.bias' is not a LORA weight loraplex understands"),
        (f"{Q0}.lora_magnitude_vector", r"'lora_magnitude_vector' is not a LORA weight"),
        ("base_model.model.lm_head.weight", r"'base_model.model.lm_head.weight' is not a LORA adapter weight"),
        ("base_model.model.model.embed_tokens.lora_embedding_A", "modules_to_save and embedding weights"),
        ("base_model.model.score.modules_to_save.weight", "is not a LORA adapter weight"),
        ("base_model.vera_A", "is not a LORA adapter weight"),
        ("something_else", "is not a LORA adapter weight"),
    ],
)
def test_unknown_keys(adapter, load, key, match):
    edit_tensors(adapter, lambda t: t.update({key: torch.ones(64)}))
    refused(load, adapter, match)


def test_non_float_dtype(adapter, load):
    edit_tensors(adapter, lambda t: t.update({f"{Q0}.lora_A.weight": torch.ones(4, 64, dtype=torch.int32)}))
    refused(load, adapter, rf"'{Q0}.lora_A.weight' has dtype 'I32'; only F32, F16 and BF16")


def test_nan(adapter, load):
    def poison(t):
        t[f"{Q0}.lora_B.weight"][3, 1] = float("nan")

    edit_tensors(adapter, poison)
    refused(load, adapter, rf"'{Q0}.lora_B.weight' contains NaN or Inf")


def test_half_precision_overflow_after_conversion(adapter, dense_view):
    edit_tensors(adapter, lambda t: t[f"{Q0}.lora_A.weight"].fill_(1e6))
    with pytest.raises(AdapterError, match=r"layer 0 q_proj: converted A \(lora_A.weight\) has NaN or Inf values in torch.float16"):
        load_adapter_dir(adapter, dense_view, max_rank=16, dtype=torch.float16)


def test_rank_over_max_rank(adapter, load):
    refused(load, adapter, "rank 4 is over the server's max rank 2", max_rank=2)
    edit_config(adapter, rank_pattern={"down_proj": 32})
    refused(load, adapter, "rank 32 is over the server's max rank 16")


def _saved(kit, tmp_path, cfg, perturb=None):
    d = tmp_path / "saved"
    kit.save_peft(d, cfg, quant="none", perturb=perturb)
    return d


def test_adalora_rank_over_max_rank_after_pruning(kit, tmp_path, load):
    cfg = AdaLoraConfig(init_r=6, target_r=2, target_modules=["q_proj"], total_step=10)
    d = _saved(kit, tmp_path, cfg, kit.perturb_params("lora_E", lambda p: torch.randn_like(p)))
    refused(load, d, "layer 0 q_proj has rank 6, over the server's max rank 4", max_rank=4)


def test_zero_modules_refused(kit, tmp_path, load):
    """An untrained AdaLoRA adapter (every lora_E is 0) would serve the base model."""
    cfg = AdaLoraConfig(init_r=4, target_r=2, target_modules=["q_proj"], total_step=10)
    refused(load, _saved(kit, tmp_path, cfg), "no non-zero module")


def test_no_targeted_module_refused(adapter, load):
    edit_config(adapter, layers_to_transform=[7])
    edit_tensors(adapter, lambda t: t.clear())
    refused(load, adapter, "no target modules: serving it would serve the base model")


def test_dora_missing_magnitude(adapter, load):
    edit_config(adapter, use_dora=True)
    refused(load, adapter, r"layer 0 \w+_proj: lora_magnitude_vector is missing")


def test_vera_projection_keys(kit, tmp_path, load):
    cfg = VeraConfig(r=4, target_modules=["q_proj"], save_projection=True)
    d = _saved(kit, tmp_path, cfg)
    edit_tensors(d, lambda t: t.pop("base_model.vera_B"))
    refused(load, d, "tensor base_model.vera_B is missing")
    edit_tensors(d, lambda t: t.update({"base_model.vera_B": torch.ones(32, 4)}))
    refused(load, d, r"base_model.vera_B has shape \(32, 4\), expected \(64, 4\)")
    edit_config(d, save_projection=False)
    refused(load, d, "'base_model.vera_A' is not a VERA adapter weight")


# -- adapter_config.json ------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported \\(supported: LORA, VERA, ADALORA, LOHA, LOKR\\)"),
        ({"peft_type": None}, "peft_type None is not supported"),
        ({"bias": "all"}, "bias='all' is not supported"),
        ({"bias": "lora_only"}, "bias='lora_only' is not supported"),
        ({"modules_to_save": ["lm_head"]}, r"modules_to_save=\['lm_head'\] is not supported"),
        ({"target_modules": ["q_proj", "lm_head"]}, "target module 'lm_head' is not one of q_proj"),
        ({"target_modules": ["embed_tokens"]}, "target module 'embed_tokens' is not one of"),
        ({"target_modules": None}, "target_modules is missing"),
        ({"target_modules": "lm_head|.*down_proj|.*q_proj"}, "matches 'lm_head', which is not one of"),
        ({"target_modules": r".*\.mlp"}, "matches 'model.layers.0.mlp', which is not one of"),
        ({"target_modules": "(unclosed"}, "not a valid regular expression"),
        ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "layers_to_transform cannot be used"),
        ({"layers_pattern": "layers"}, "layers_pattern needs layers_to_transform"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa': this initialisation rewrites the base"),
        ({"init_lora_weights": "pissa_niter_4"}, "rewrites the base"),
        ({"init_lora_weights": "olora"}, "rewrites the base"),
        ({"init_lora_weights": "loftq"}, "rewrites the base"),
        ({"lora_bias": True}, "lora_bias=True is not supported for LORA"),
        ({"layer_replication": [[0, 2]]}, "layer_replication changes the base model's layers"),
        ({"trainable_token_indices": [1, 2]}, "trainable tokens change the embeddings"),
        ({"target_parameters": ["mlp.experts.w"]}, "target_parameters"),
        ({"alora_invocation_tokens": [5]}, "activated LoRA"),
        ({"use_qalora": True}, "QALoRA is not supported"),
        ({"new_peft_feature": 3}, "field new_peft_feature=3 is not a LORA field loraplex knows"),
        ({"r": 0}, "r must be a positive integer"),
        ({"r": 4.0}, "r must be a positive integer"),
        ({"r": True}, "r must be a positive integer"),
        ({"lora_alpha": "8"}, "lora_alpha must be a finite number"),
        ({"use_dora": "yes"}, "use_dora must be true or false"),
        ({"rank_pattern": {"q_proj": 2.5}}, r"rank_pattern\['q_proj'\] must be a positive integer"),
        ({"rank_pattern": {"q_proj(": 2}}, "not a valid regular expression"),
        ({"alpha_pattern": {"q_proj": None}}, "alpha_pattern"),
    ],
)
def test_config_refusals(adapter, load, changes, match):
    edit_config(adapter, **changes)
    refused(load, adapter, match)


def test_unknown_field_with_a_default_value_is_ignored(adapter, load):
    edit_config(adapter, new_peft_feature=None, other_feature=False, third={})
    assert load(adapter).modules


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "adapter_config.json is not valid JSON"),
        ('{"r": 4, "r": 8}', "adapter_config.json has the key 'r' twice"),
        ("[1, 2]", "must hold a JSON object, not a list"),
        ('{"peft_type": "LORA", "lora_alpha": NaN}', "NaN, which is not JSON"),
    ],
)
def test_config_not_json(adapter, load, text, match):
    (adapter / "adapter_config.json").write_text(text)
    refused(load, adapter, match)


@pytest.mark.parametrize(
    "peft_config, changes, match",
    [
        (VeraConfig(r=4, target_modules=["q_proj"]), {"use_dora": True}, "use_dora=True is not supported for VERA: DoRA"),
        (VeraConfig(r=4, target_modules=["q_proj"]), {"r": 64}, "rank 64 is over the server's max rank 16"),
        (AdaLoraConfig(init_r=4, target_modules=["q_proj"], total_step=10), {"use_dora": True}, "AdaLoRA does not support DoRA"),
        (AdaLoraConfig(init_r=4, target_modules=["q_proj"], total_step=10), {"init_r": 0}, "init_r must be a positive integer"),
        (AdaLoraConfig(init_r=4, target_modules=["q_proj"], total_step=10),
         {"rank_pattern": {"model.layers.0.self_attn.q_proj.lora_E": [True, False]}}, "rank_pattern for layer 0 q_proj has 2 entries, expected init_r=4"),
        (AdaLoraConfig(init_r=4, target_modules=["q_proj"], total_step=10),
         {"rank_pattern": {"model.layers.0.self_attn.q_proj.lora_E": [1, 0, 1, 1]}}, "must be a list of true/false"),
        (AdaLoraConfig(init_r=4, target_modules=["q_proj"], total_step=10),
         {"rank_pattern": {"lm_head.lora_E": [True] * 4}}, "does not name a target module's lora_E"),
    ],
)  # fmt: skip
def test_type_specific_config_refusals(tmp_path, load, peft_config, changes, match):
    d = tmp_path / "a"
    peft_config.save_pretrained(str(d))
    edit_config(d, **changes)
    save_file({}, str(d / "adapter_model.safetensors"))
    refused(load, d, match)


@pytest.mark.parametrize(
    "peft_config",
    [LoraConfig(target_modules=["q_proj"]), VeraConfig(target_modules=["q_proj"]),
     AdaLoraConfig(target_modules=["q_proj"], total_step=10)],
)  # fmt: skip
def test_every_field_peft_writes_is_known(tmp_path, peft_config):
    """PEFT 0.21's default configs, as save_pretrained writes them, parse."""
    peft_config.save_pretrained(str(tmp_path))
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert parse_adapter_config(raw).peft_type == raw["peft_type"]
