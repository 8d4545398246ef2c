"""PEFT adapters -> the one form: for every adapted module, PEFT's module output equals
g ⊙ (base(x) + s·(x Aᵀ) Bᵀ) computed from our A, B, s, g (fp32, tight tolerance)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, PeftModel, VeraConfig
from peft.tuners.tuners_utils import BaseTunerLayer

from loraplex.adapters.form import TARGET_MODULES, AdapterWeights
from loraplex.adapters.loader import load_adapter_dir

ALL = list(TARGET_MODULES)


@pytest.fixture
def load(kit):
    def load(directory, peft_model, dtype=torch.float32, max_rank=64) -> AdapterWeights:
        return load_adapter_dir(directory, kit.HFBaseView(peft_model), max_rank=max_rank, dtype=dtype)

    return load


def form_output(module, d, x):
    base = module.get_base_layer()(x)
    y = base + x @ d.dense().T
    return y if d.g is None else d.g.float() * y


def check_against_peft(kit, peft_model, weights: AdapterWeights, *, rtol=1e-5) -> None:
    """Every module PEFT adapted: our form reproduces its output; modules we dropped
    (AdaLoRA rows all pruned) leave PEFT's output equal to the base's."""
    gen = torch.Generator().manual_seed(1234)
    adapted = 0
    for layer in range(2):
        for name in TARGET_MODULES:
            module = kit.peft_module(peft_model, layer, name)
            if not isinstance(module, BaseTunerLayer):
                assert (layer, name) not in weights.modules
                continue
            adapted += 1
            x = torch.randn(5, module.in_features, generator=gen)
            with torch.no_grad():
                want = module(x)
                d = weights.modules.get((layer, name))
                got = module.get_base_layer()(x) if d is None else form_output(module, d, x)
            scale = want.abs().max().item()
            torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale, msg=f"layer {layer} {name}")
    assert adapted > 0


def test_lora_dense_base(tmp_path, kit, load):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights=False)
    model = kit.save_peft(tmp_path, cfg, quant="none")
    w = load(tmp_path, model)
    assert w.adapter_type == "lora" and len(w.modules) == 14
    assert all(d.scale == 2.0 and d.g is None and d.rank == 4 for d in w.modules.values())
    assert w.config["peft_type"] == "LORA" and json.loads(json.dumps(w.config)) == w.config
    check_against_peft(kit, model, w)


def test_lora_nf4_rank_and_alpha_pattern(tmp_path, kit, load):
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
        rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6}, alpha_pattern={"v_proj": 3},
    )  # fmt: skip
    model = kit.save_peft(tmp_path, cfg)
    w = load(tmp_path, model)
    assert w.ranks == {"q_proj": [2, 2], "v_proj": [4, 4], "down_proj": [4, 6]}
    assert w.modules[(0, "q_proj")].scale == 8 / 2
    assert w.modules[(0, "v_proj")].scale == 3 / 4
    assert w.modules[(1, "down_proj")].scale == 8 / 6
    check_against_peft(kit, model, w)


def test_rslora_nf4(tmp_path, kit, load):
    cfg = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["k_proj", "up_proj"], init_lora_weights=False)
    model = kit.save_peft(tmp_path, cfg)
    w = load(tmp_path, model)
    assert all(d.scale == 16 / math.sqrt(8) for d in w.modules.values())
    check_against_peft(kit, model, w)


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_dora(tmp_path, quant, kit, load):
    cfg = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "o_proj", "gate_proj"],
                     init_lora_weights=False)  # fmt: skip
    # At init m = ‖W + s·BA‖, so g = 1: perturb m so g carries information.
    perturb = kit.perturb_params("lora_magnitude_vector", lambda p: p * (1 + 0.2 * torch.randn_like(p)))
    model = kit.save_peft(tmp_path, cfg, quant=quant, perturb=perturb)
    w = load(tmp_path, model)
    assert w.adapter_type == "dora"
    for d in w.modules.values():
        assert d.g is not None and (d.g - 1).abs().max() > 0.01
    check_against_peft(kit, model, w)


def test_dora_uses_dequantized_nf4_weight(tmp_path, kit, load):
    """g depends on W: with the dense weights instead of the NF4 ones, it would differ."""
    cfg = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"], init_lora_weights=False)
    model = kit.save_peft(tmp_path, cfg, quant="nf4")
    w_nf4 = load(tmp_path, model)
    w_dense = load_adapter_dir(tmp_path, kit.HFBaseView(kit.make_base("none")), max_rank=8, dtype=torch.float32)
    g1, g2 = w_nf4.modules[(0, "q_proj")].g, w_dense.modules[(0, "q_proj")].g
    assert not torch.allclose(g1, g2, rtol=1e-4)


def test_dora_norm_in_row_chunks_matches_one_piece():
    """What a GPU computes (chunks of W + s·B·A rows) against what the CPU does (one piece)."""
    from loraplex.adapters.lora import dora_norm

    gen = torch.Generator().manual_seed(0)
    w, a, b = torch.randn(37, 24, generator=gen), torch.randn(5, 24, generator=gen), torch.randn(37, 5, generator=gen)
    whole = dora_norm(w, a, b, 0.7)
    torch.testing.assert_close(whole, torch.linalg.norm(w + 0.7 * (b @ a), dim=1), rtol=0, atol=0)
    for rows in (1, 8, 36, 37, 100):
        torch.testing.assert_close(dora_norm(w, a, b, 0.7, rows=rows), whole)


def _perturb_vera(model):
    for n, p in model.named_parameters():
        if "vera_lambda_" in n:
            p.copy_(torch.randn_like(p))


@pytest.mark.parametrize("save_projection", [True, False])
def test_vera(tmp_path, save_projection, kit, load):
    # Modules of different shapes: the shared projections are sliced per module.
    cfg = VeraConfig(r=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], save_projection=save_projection,
                     projection_prng_key=7)  # fmt: skip
    model = kit.save_peft(tmp_path, cfg, perturb=_perturb_vera)
    w = load(tmp_path, model)
    assert w.adapter_type == "vera" and len(w.modules) == 8
    assert all(d.scale == 1.0 and d.rank == 8 for d in w.modules.values())
    check_against_peft(kit, model, w)
    # the projections are shared: one key (and one host tensor) per module shape
    q0, q1, v0 = w.modules[(0, "q_proj")], w.modules[(1, "q_proj")], w.modules[(0, "v_proj")]
    assert q0.shared_key == q1.shared_key != w.modules[(0, "down_proj")].shared_key
    assert q0.a.data_ptr() == q1.a.data_ptr() == v0.a.data_ptr() and not torch.equal(q0.rank_scale, q1.rank_scale)


def test_vera_adapters_with_the_same_projections_share_their_factors(tmp_path, kit, load):
    def make(name, key, seed):
        gen = torch.Generator().manual_seed(seed)

        def perturb(model):
            for n, p in model.named_parameters():
                if "vera_lambda_" in n:
                    p.copy_(torch.randn(p.shape, generator=gen))

        cfg = VeraConfig(r=8, target_modules=["q_proj"], projection_prng_key=key)
        return load(tmp_path / name, kit.save_peft(tmp_path / name, cfg, perturb=perturb))

    a, b, c = make("a", 7, 0), make("b", 7, 1), make("c", 8, 2)
    ka, kb, kc = (w.modules[(0, "q_proj")] for w in (a, b, c))
    assert ka.shared_key == kb.shared_key != kc.shared_key
    assert torch.equal(ka.a, kb.a) and torch.equal(ka.b, kb.b) and not torch.equal(ka.out_scale, kb.out_scale)


def _perturb_adalora(model):
    """Non-zero singular values, a few zeroed as AdaLoRA's pruning does."""
    for n, p in model.named_parameters():
        if "lora_E" in n:
            e = torch.randn_like(p)
            k = len(e) - 1 - (hash(n) % 3)  # keep a different number of rows per module
            e[k:] = 0
            e[0] = 0
            p.copy_(e[torch.randperm(len(e))])


def test_adalora_heterogeneous_ranks(tmp_path, kit, load):
    cfg = AdaLoraConfig(init_r=6, target_r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"],
                        total_step=10)  # fmt: skip
    model = kit.save_peft(tmp_path, cfg, perturb=_perturb_adalora)
    w = load(tmp_path, model)
    assert w.adapter_type == "adalora"
    for (layer, name), d in w.modules.items():
        e = kit.peft_module(model, layer, name).lora_E["default"]
        assert d.rank == int((e != 0).sum())
        assert d.scale == pytest.approx(12 / (6 + 1e-5), rel=1e-7)
    check_against_peft(kit, model, w)


def test_adalora_rank_pattern(tmp_path, kit, load):
    """A config with AdaLoRA's rank_pattern: PEFT saves only the kept rows, and a module
    pruned to rank 0 (stored as [0, in]) is dropped."""
    cfg = AdaLoraConfig(init_r=6, target_r=4, target_modules=["q_proj", "v_proj"], total_step=10)
    model = kit.make_base("nf4")
    from peft import get_peft_model

    model = get_peft_model(model, cfg).eval()
    names = [n for n, _ in model.get_base_model().named_parameters() if "lora_E" in n]
    masks = {n: [i % 3 != 1 for i in range(6)] for n in names}
    masks[names[1]] = [False] * 6  # layer 0 v_proj: fully pruned
    masks[names[2]] = [True] * 6  # layer 1 q_proj: nothing pruned
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_E" in n:
                p.copy_(torch.randn_like(p))
    model.peft_config["default"].rank_pattern = masks
    model.base_model.rankallocator.mask_using_rank_pattern(model.get_base_model(), masks)
    model.save_pretrained(str(tmp_path))

    w = load(tmp_path, model)
    assert set(w.modules) == {(0, "q_proj"), (1, "q_proj"), (1, "v_proj")}
    assert w.ranks == {"q_proj": [4, 6], "v_proj": [4]}
    check_against_peft(kit, model, w)
    # And as PEFT itself loads the directory (resize by rank_pattern, ranknum restored to init_r).
    reloaded = PeftModel.from_pretrained(kit.make_base("nf4"), str(tmp_path)).eval()
    check_against_peft(kit, reloaded, w)


def test_layers_to_transform_and_regex_targets(tmp_path, kit, load):
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"], layers_to_transform=[1], init_lora_weights=False)
    model = kit.save_peft(tmp_path / "a", cfg)
    w = load(tmp_path / "a", model)
    assert set(w.modules) == {(1, "o_proj")}
    check_against_peft(kit, model, w)

    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=r".*\.layers\.0\.mlp\.(gate|up)_proj", init_lora_weights=False)
    model = kit.save_peft(tmp_path / "b", cfg)
    w = load(tmp_path / "b", model)
    assert set(w.modules) == {(0, "gate_proj"), (0, "up_proj")}
    check_against_peft(kit, model, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_output_dtype(tmp_path, dtype, kit, load):
    cfg = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"], init_lora_weights=False)
    model = kit.save_peft(tmp_path, cfg)
    w32 = load(tmp_path, model)
    w = load(tmp_path, model, dtype=dtype)
    for key, d in w.modules.items():
        assert d.a.dtype == d.b.dtype == d.g.dtype == dtype
        torch.testing.assert_close(d.b.float(), w32.modules[key].b, rtol=1e-2, atol=1e-2)
