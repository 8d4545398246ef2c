"""LoHa and LoKr adapters made by PEFT -> the one form, exactly (B·A equals PEFT's
get_delta_weight up to float32 rounding, and each module's output equals PEFT's), and
everything about them that is refused, message included. Engine fidelity (logits, greedy
tokens, mixed batches with the other types) is in tests/engine/test_fidelity.py.

PEFT 0.21 cannot wrap bitsandbytes' Linear4bit with LoHa or LoKr (it sizes the factors by
base_layer.weight.shape, the packed 4-bit storage), so these adapters are made on the dense base."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from loraplex.adapters.config import parse_adapter_config
from loraplex.adapters.errors import AdapterError
from loraplex.adapters.form import TARGET_MODULES
from loraplex.adapters.loader import load_adapter_dir, summarize_adapter_dir
from loraplex.adapters.lokr import factorization

ALL = list(TARGET_MODULES)
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _randomize(model):
    """Every LoHa/LoKr factor random (PEFT's init leaves one at zero)."""
    for n, p in model.named_parameters():
        if "hada_" in n or "lokr_" in n:
            p.copy_(torch.randn_like(p) * 0.3)


@pytest.fixture
def saved(tmp_path, kit):
    def saved(cfg, name="a"):
        d = tmp_path / name
        return d, kit.save_peft(d, cfg, quant="none", perturb=_randomize)

    return saved


@pytest.fixture
def load(kit):
    def load(d, model, max_rank=64, dtype=torch.float32):
        return load_adapter_dir(d, kit.HFBaseView(model), max_rank=max_rank, dtype=dtype)

    return load


def _check_exact(kit, model, weights) -> float:
    """Every adapted module: our s·B·A equals PEFT's delta weight, and our module output
    (base(x) + x (s·B·A)ᵀ) equals PEFT's. Returns the largest |ours - PEFT's| of the deltas."""
    gen = torch.Generator().manual_seed(7)
    worst, adapted = 0.0, 0
    for layer in range(kit.TINY["num_hidden_layers"]):
        for name in TARGET_MODULES:
            module = kit.peft_module(model, layer, name)
            if not isinstance(module, BaseTunerLayer):
                assert (layer, name) not in weights.modules
                continue
            adapted += 1
            d = weights.modules[(layer, name)]
            with torch.no_grad():
                ref = module.get_delta_weight("default")
                got = d.dense()
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
                worst = max(worst, (got - ref).abs().max().item())
                x = torch.randn(5, module.in_features, generator=gen)
                want = module(x)
                mine = module.get_base_layer()(x) + x @ got.T
                torch.testing.assert_close(mine, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert adapted > 0
    return worst


# -- LoHa -------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [1, 2, 4, 8])
def test_loha_is_exact_at_rank_r_squared(saved, load, kit, r):
    d, model = saved(LoHaConfig(r=r, alpha=2 * r + 1, target_modules=ALL))
    w = load(d, model)
    assert w.adapter_type == "loha" and len(w.modules) == 14
    assert {m.rank for m in w.modules.values()} == {r * r}
    assert all(m.scale == pytest.approx((2 * r + 1) / r) for m in w.modules.values())
    _check_exact(kit, model, w)


def test_loha_rank_and_alpha_patterns(saved, load, kit):
    cfg = LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"layers.1.self_attn.v_proj": 2, "down_proj": 6}, alpha_pattern={"q_proj": 3})  # fmt: skip
    d, model = saved(cfg)
    w = load(d, model)
    assert w.ranks == {"q_proj": [16, 16], "v_proj": [16, 4], "down_proj": [36, 36]}
    assert w.modules[(0, "q_proj")].scale == pytest.approx(3 / 4)
    assert w.modules[(1, "v_proj")].scale == pytest.approx(8 / 2)
    _check_exact(kit, model, w)


def test_loha_in_half_precision(saved, load, kit):
    d, model = saved(LoHaConfig(r=3, target_modules=["q_proj", "up_proj"]))
    w16 = load(d, model, dtype=torch.bfloat16)
    w32 = load(d, model)
    for key, m in w16.modules.items():
        assert m.a.dtype == m.b.dtype == torch.bfloat16
        ref = w32.modules[key].dense()
        torch.testing.assert_close(m.dense(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_loha_over_max_rank_names_the_effective_rank(saved, load):
    d, model = saved(LoHaConfig(r=5, target_modules=["q_proj"]))
    with pytest.raises(AdapterError, match=r"rank 25 is over the server's max rank 16 \(LoHa serves at effective rank "
                                           r"r·r = 5·5: the Hadamard product of two rank-5 products\); raise --max-rank "
                                           r"to at least 25 to serve it"):  # fmt: skip
        load(d, model, max_rank=16)
    assert load(d, model, max_rank=25).max_rank == 25


def test_loha_rank_pattern_over_max_rank(saved, load):
    d, model = saved(LoHaConfig(r=2, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 6}))
    with pytest.raises(AdapterError, match=r"rank 36 is over the server's max rank 32 .*r·r = 6·6.*at least 36"):
        load(d, model, max_rank=32)


def test_loha_cp_tensors_refused(saved, load):
    d, model = saved(LoHaConfig(r=2, target_modules=["q_proj"]))
    p = d / "adapter_model.safetensors"
    t = load_file(str(p))
    t[f"{Q0}.hada_t1"] = torch.ones(2, 2, 1, 1)
    save_file(t, str(p))
    with pytest.raises(AdapterError, match=r"layer 0 q_proj: hada_t1 is LoHa's CP \(Tucker\) decomposition for "
                                           r"convolutions \(use_effective_conv2d\); it is not supported"):  # fmt: skip
        load(d, model)


def test_use_effective_conv2d_is_inert_on_linear_layers(saved, load, kit):
    """PEFT ignores use_effective_conv2d on nn.Linear: the same tensors, the same delta."""
    d, model = saved(LoHaConfig(r=2, target_modules=["q_proj"], use_effective_conv2d=True))
    _check_exact(kit, model, load(d, model))


# -- LoKr -------------------------------------------------------------------------------------


def test_factorization_is_peft_s():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dim in [1, 2, 7, 32, 64, 96, 127, 128, 320, 4096, 11008, 14336]:
        for f in [-1, 0, 1, 2, 3, 4, 8, 16, 100, -5]:
            assert factorization(dim, f) == peft_factorization(dim, f), (dim, f)


LOKR_CASES = {
    # tiny base: q/o [64, 64] -> W1 [8, 8], W2 [8, 8]; k/v [32, 64] -> W1 [4, 8], W2 [8, 8];
    # gate/up [128, 64] -> W1 [8, 8], W2 [16, 8]; down [64, 128] -> W1 [8, 8], W2 [8, 16]
    "w1 full, w2 factored": (LoKrConfig(r=2, alpha=3, target_modules=ALL), {"q_proj": 16, "k_proj": 8, "up_proj": 16}),
    "both full": (LoKrConfig(r=8, alpha=4, target_modules=ALL), {"q_proj": 64, "k_proj": 32, "up_proj": 64, "down_proj": 64}),
    "both factored": (LoKrConfig(r=1, decompose_both=True, target_modules=ALL), {"q_proj": 1, "k_proj": 1, "down_proj": 1}),
    "w1 factored, w2 full": (LoKrConfig(r=3, alpha=5, decompose_both=True, decompose_factor=16, target_modules=["q_proj", "down_proj"]),
                             {"q_proj": 12, "down_proj": 9}),  # W1 [16, 16] at r=3; W2 [4, 4] full, [4, 8] factored
    "decompose_factor 4, patterns": (LoKrConfig(r=4, decompose_factor=4, target_modules=["q_proj", "v_proj", "gate_proj"],
                                                rank_pattern={"v_proj": 2}, alpha_pattern={"gate_proj": 1.5}),
                                     {"q_proj": 16, "v_proj": 8, "gate_proj": 16}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(LOKR_CASES))
def test_lokr_is_exact(saved, load, kit, case):
    cfg, ranks = LOKR_CASES[case]
    d, model = saved(cfg)
    w = load(d, model)
    assert w.adapter_type == "lokr"
    for name, r in ranks.items():
        assert w.ranks[name] == [r, r], name
    _check_exact(kit, model, w)
    # the registration path gives the same ranks from the config and the base's shapes alone
    s = summarize_adapter_dir(d, 2, max_rank=64, base=kit.HFBaseView(model))
    assert s.ranks == w.ranks and s.adapter_type == "lokr"


def test_lokr_over_max_rank_names_the_effective_rank(saved, load, kit):
    d, model = saved(LoKrConfig(r=8, target_modules=["q_proj"]))
    msg = (r"layer 0 q_proj has rank 64, over the server's max rank 32 \(the rank of its lokr delta as served, B·A\); "
           r"raise --max-rank to at least 64 to serve it")  # fmt: skip
    with pytest.raises(AdapterError, match=msg):
        load(d, model, max_rank=32)
    with pytest.raises(AdapterError, match=msg):
        summarize_adapter_dir(d, 2, max_rank=32, base=kit.HFBaseView(model))


def test_lokr_t2_refused(saved, load):
    d, model = saved(LoKrConfig(r=2, target_modules=["q_proj"]))
    p = d / "adapter_model.safetensors"
    t = load_file(str(p))
    t[f"{Q0}.lokr_t2"] = torch.ones(2, 2, 1, 1)
    save_file(t, str(p))
    with pytest.raises(AdapterError, match=r"layer 0 q_proj: lokr_t2 is LoKr's CP \(Tucker\) decomposition"):
        load(d, model)


def test_lokr_layout_other_than_peft_s_refused(saved, load):
    """A full W2 where PEFT builds a factored one (PEFT would leave lokr_w2_a/b at their init)."""
    d, model = saved(LoKrConfig(r=2, target_modules=["q_proj"]))
    p = d / "adapter_model.safetensors"
    t = load_file(str(p))
    t[f"{Q0}.lokr_w2"] = t.pop(f"{Q0}.lokr_w2_a") @ t.pop(f"{Q0}.lokr_w2_b")
    save_file(t, str(p))
    with pytest.raises(AdapterError, match=r"layer 0 q_proj: the file holds lokr_w1, lokr_w2, but PEFT builds lokr_w1 "
                                           r"\[8, 8\] and lokr_w2_a/lokr_w2_b \(r=2\) for this module"):  # fmt: skip
        load(d, model)


def test_lokr_wrong_shape_refused(saved, load):
    d, model = saved(LoKrConfig(r=2, target_modules=["q_proj"]))
    p = d / "adapter_model.safetensors"
    t = load_file(str(p))
    t[f"{Q0}.lokr_w1"] = torch.ones(4, 16)
    save_file(t, str(p))
    with pytest.raises(AdapterError, match=r"layer 0 q_proj: lokr_w1 has shape \(4, 16\), expected \(8, 8\)"):
        load(d, model)


# -- configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [LoHaConfig(target_modules=["q_proj"]), LoKrConfig(target_modules=["q_proj"]),
                                 LoKrConfig(target_modules=["q_proj"], init_weights="lycoris", rank_dropout=0.1,
                                            module_dropout=0.1, rank_dropout_scale=True)])  # fmt: skip
def test_every_field_peft_writes_is_known(tmp_path, cfg):
    cfg.save_pretrained(str(tmp_path))
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    c = parse_adapter_config(raw)
    assert c.peft_type == raw["peft_type"] and c.lora_alpha == raw["alpha"]


@pytest.mark.parametrize(
    "cfg, changes, match",
    [
        (LoHaConfig(target_modules=["q_proj"]), {"use_dora": True}, "field use_dora=True is not a LOHA field loraplex knows"),
        (LoHaConfig(target_modules=["q_proj"]), {"decompose_both": True}, "field decompose_both=True is not a LOHA field"),
        (LoHaConfig(target_modules=["q_proj"]), {"r": 0}, "r must be a positive integer"),
        (LoHaConfig(target_modules=["q_proj"]), {"alpha": "8"}, "alpha must be a finite number"),
        (LoHaConfig(target_modules=["q_proj"]), {"modules_to_save": ["lm_head"]}, "modules_to_save=.* is not supported"),
        (LoKrConfig(target_modules=["q_proj"]), {"decompose_factor": 2.5}, r"decompose_factor must be an integer \(-1: automatic\)"),
        (LoKrConfig(target_modules=["q_proj"]), {"decompose_both": "yes"}, "decompose_both must be true or false"),
        (LoKrConfig(target_modules=["q_proj"]), {"lora_alpha": 8}, "field lora_alpha=8 is not a LOKR field"),
        (LoKrConfig(target_modules=["lm_head"]), {}, "target module 'lm_head' is not one of"),
    ],
)  # fmt: skip
def test_config_refusals(tmp_path, kit, cfg, changes, match):
    cfg.save_pretrained(str(tmp_path))
    p = tmp_path / "adapter_config.json"
    p.write_text(json.dumps(json.loads(p.read_text()) | changes))
    save_file({}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=match):
        load_adapter_dir(tmp_path, kit.HFBaseView(kit.make_base("none")), max_rank=64, dtype=torch.float32)


def test_summarize_declares_the_served_ranks(tmp_path, kit):
    LoHaConfig(r=3, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}).save_pretrained(str(tmp_path))
    save_file({}, str(tmp_path / "adapter_model.safetensors"))
    s = summarize_adapter_dir(tmp_path, 2, max_rank=16)
    assert s.adapter_type == "loha" and s.ranks == {"q_proj": [9, 9], "v_proj": [4, 4]}
    with pytest.raises(AdapterError, match="rank 9 is over the server's max rank 8 .*raise --max-rank to at least 9"):
        summarize_adapter_dir(tmp_path, 2, max_rank=8)


# -- base-modifying LoRA initialisations ------------------------------------------------------


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda"])
def test_unconverted_base_modifying_init_says_how_to_convert(tmp_path, init):
    raw = json.loads(json.dumps(LoraConfig(target_modules=["q_proj"]).to_dict(), default=list)) | {"init_lora_weights": init}
    with pytest.raises(AdapterError, match=rf"init_lora_weights='{init}': this initialisation rewrites the base model's "
                                           r"weights .*save the adapter as initialised, before training, to a directory "
                                           r"INIT, then save the trained one with PEFT's save_pretrained\(\.\.\., "
                                           r"path_initial_model_for_weight_conversion=INIT\), which writes a rank-2r LoRA"):  # fmt: skip
        parse_adapter_config(raw)


def test_loftq_says_it_needs_its_own_quantized_base():
    raw = json.loads(json.dumps(LoraConfig(target_modules=["q_proj"]).to_dict(), default=list)) | {"init_lora_weights": "loftq"}
    with pytest.raises(AdapterError, match=r"init_lora_weights='loftq': this initialisation rewrites the base model's "
                                           r"weights .*only works on the quantized base LoftQ saved with it.*PEFT cannot "
                                           r"convert it to a plain LoRA; serve it with its own quantized base"):  # fmt: skip
        parse_adapter_config(raw)
