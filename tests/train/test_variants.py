"""The trainer's variants on the bundled tiny model (CPU, a few steps each): LoHa, LoKr, the
gaussian/PiSSA/OLoRA inits, LoRA-FA, NEFTune and rsLoRA each lower the eval loss and write a
PEFT adapter that loraplex's model runner serves with the logits PEFT gives for it — for
PiSSA/OLoRA the converted plain LoRA on the unmodified NF4 base, for LoHa/LoKr (which PEFT
cannot put on 4-bit layers) on the dequantized NF4 weights. LoRA-FA leaves A at its init,
NEFTune's noise reaches training only, rsLoRA's scaling is in the saved config."""

import json

import pytest
import torch
from safetensors.torch import load_file

from loraplex.adapters.train.config import TrainConfig
from loraplex.adapters.train.trainer import load_quantized_base, peft_config, train
from loraplex.adapters.train.variants import dense_nf4_decoder_, neftune

STEPS = 12
RANK = 4
VARIANTS = {
    "loha": dict(adapter_type="loha", lr=1e-2),
    "lokr": dict(adapter_type="lokr", lr=1e-2),
    "gaussian": dict(init="gaussian", lr=5e-3),
    "pissa": dict(init="pissa", lr=2e-3),
    "olora": dict(init="olora", lr=2e-3),
    "lora-fa": dict(lora_fa=True, lr=5e-3),
    "neftune": dict(neftune_alpha=5.0, lr=5e-3),
    "rslora": dict(rslora=True, lr=5e-3),
}
PEFT_TYPE = {"loha": "LOHA", "lokr": "LOKR"}
SERVED_TYPE = {"loha": "loha", "lokr": "lokr"}  # everything else serves as plain LoRA


def _config(model_dir, data, out, **kwargs) -> TrainConfig:
    args = dict(rank=RANK, max_steps=STEPS, batch_size=8, eval_fraction=0.25, eval_every=0, save_every=STEPS // 2,
                warmup_steps=1, progress=False)
    return TrainConfig(model=str(model_dir), data=str(data), out=str(out), **{**args, **kwargs})


@pytest.fixture(scope="module")
def trained(tiny_model_dir, pair_data, tmp_path_factory):
    """variant -> TrainResult, each trained once per module."""
    cache = {}

    def get(variant):
        if variant not in cache:
            out = tmp_path_factory.mktemp(variant) / "adapter"
            cache[variant] = train(_config(tiny_model_dir, pair_data, out, **VARIANTS[variant]))
        return cache[variant]

    return get


def _peft_oracle(tiny_model_dir, adapter_dir, dense: bool):
    """PEFT's model of a saved adapter on a freshly quantized NF4 base (dense: its dequantized weights)."""
    from peft import PeftModel

    base, _ = load_quantized_base(tiny_model_dir)
    if dense:
        dense_nf4_decoder_(base, torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


IDS = [1] + [b + 3 for b in b"the old man likes the moon"]  # byte ids follow the 3 specials


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_learns_and_serves_peft_logits(variant, trained, tiny_model_dir, runner_model):
    from loraplex.adapters.loader import load_adapter_dir, summarize_adapter_dir
    from loraplex.server.model.llama import score_sequence

    result = trained(variant)
    (step0, before), (step_n, after) = result.eval_losses[0], result.eval_losses[-1]
    assert (step0, step_n) == (0, STEPS)
    assert after < 0.9 * before, result.eval_losses
    out = result.out_dir
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == PEFT_TYPE.get(variant, "LORA")
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [f"checkpoint-{STEPS // 2}"]  # no initial adapter left

    # PEFT's logits of the saved adapter (PiSSA/OLoRA: the converted LoRA on the unmodified NF4 base)
    # are the trained model's, and loraplex serves them
    oracle = _peft_oracle(tiny_model_dir, out, dense=variant in ("loha", "lokr"))
    x = torch.tensor([IDS])
    with torch.no_grad():
        want = oracle(input_ids=x).logits[0]
        trained_logits = result.model.eval()(input_ids=x).logits[0]
    torch.testing.assert_close(want, trained_logits, atol=1e-4, rtol=1e-4)

    model, pages = runner_model
    summary = summarize_adapter_dir(out, model.num_layers, max_rank=64, base=model)  # what registering/uploading checks
    weights = load_adapter_dir(out, model, max_rank=64, dtype=torch.float32)
    assert summary.adapter_type == weights.adapter_type == SERVED_TYPE.get(variant, "lora")
    served_ranks = sorted(d.rank for d in weights.modules.values())
    assert served_ranks == sorted(result.ranks.values()) == sorted(r for rs in summary.ranks.values() for r in rs)
    pages.write(0, weights)
    got = score_sequence(model, IDS, slot=0)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - score_sequence(model, IDS, slot=-1)).abs().max() > 1e-2  # the adapter does something


def test_dense_base_is_the_nf4_base(tiny_model_dir, runner_model):
    """LoHa/LoKr/PiSSA/OLoRA train on dequantized NF4 linears: the same logits as the 4-bit base and the runner's."""
    from loraplex.server.model.llama import score_sequence

    nf4, _ = load_quantized_base(tiny_model_dir)
    x = torch.tensor([IDS])
    with torch.no_grad():
        want = nf4(input_ids=x).logits[0]
        dense = dense_nf4_decoder_(nf4, torch.float32)
        got = dense(input_ids=x).logits[0]
    assert type(dense.model.layers[0].mlp.down_proj) is torch.nn.Linear and not dense.is_loaded_in_4bit
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(score_sequence(runner_model[0], IDS, slot=-1), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["pissa", "olora"])
def test_pissa_olora_are_saved_converted_to_plain_lora(variant, trained, tiny_model_dir):
    result = trained(variant)
    alpha = result.run["config"]["alpha"]
    for directory in (result.out_dir, result.out_dir / f"checkpoint-{STEPS // 2}"):
        config = json.loads((directory / "adapter_config.json").read_text())
        assert config["init_lora_weights"] is True  # served as is: the server refuses "pissa"/"olora"
        assert (config["r"], config["lora_alpha"]) == (2 * RANK, 2 * alpha)
    assert set(result.ranks.values()) == {2 * RANK}
    # the trained model's base is the residual dequantize(Q(W)) - s·B0·A0, not the NF4 weights the
    # converted adapter is served on
    nf4, _ = load_quantized_base(tiny_model_dir)
    residual = result.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    dense = dense_nf4_decoder_(nf4, torch.float32).model.layers[0].self_attn.q_proj.weight
    assert (residual - dense).abs().max() > 1e-2


def test_lora_fa_leaves_a_at_its_init(trained, tiny_model_dir, pair_data, tmp_path):
    from peft import get_peft_model
    from peft.optimizers.lorafa import LoraFAOptimizer

    result = trained("lora-fa")
    assert isinstance(result.optimizer, LoraFAOptimizer)
    assert not [n for n, p in result.model.named_parameters() if "lora_A" in n and p.requires_grad]
    cfg = _config(tiny_model_dir, pair_data, tmp_path, **VARIANTS["lora-fa"])
    base, _ = load_quantized_base(tiny_model_dir)
    torch.manual_seed(cfg.seed)  # as train() seeds the adapter's init
    fresh = get_peft_model(base, peft_config(cfg, STEPS))
    init = {n.replace(".default", ""): p for n, p in fresh.named_parameters() if ".lora_" in n}
    saved = load_file(str(result.out_dir / "adapter_model.safetensors"))
    a_keys = [k for k in saved if ".lora_A." in k]
    assert len(a_keys) == len(saved) // 2 == 4 * 7
    for key in a_keys:
        torch.testing.assert_close(saved[key], init[key], atol=0, rtol=0)
        b = key.replace("lora_A", "lora_B")
        assert not torch.equal(saved[b], init[b])  # B trained (from zero)
    assert result.trainable_params == sum(saved[k.replace("lora_A", "lora_B")].numel() for k in a_keys)


def test_neftune_noise_is_for_training_only(tiny_model_dir):
    base, _ = load_quantized_base(tiny_model_dir)
    x = torch.tensor([IDS])
    embed = base.get_input_embeddings()
    clean = embed(x)
    alpha = 5.0
    bound = alpha / (x.shape[1] * clean.shape[-1]) ** 0.5
    with neftune(base, alpha):
        base.train()
        noisy = embed(x)
        base.eval()
        assert torch.equal(embed(x), clean)
    assert 0 < (noisy - clean).abs().max() <= bound
    base.train()
    assert torch.equal(embed(x), clean)  # the hook is gone


def test_neftune_changes_training_not_evaluation(trained, tiny_model_dir, pair_data, tmp_path):
    runs = {alpha: train(_config(tiny_model_dir, pair_data, tmp_path / str(alpha), neftune_alpha=alpha, lr=5e-3,
                                 max_steps=2, save_every=0))
            for alpha in (0.0, 5.0)}  # fmt: skip
    plain, noisy = runs[0.0], runs[5.0]
    assert plain.eval_losses[0] == noisy.eval_losses[0]  # same init, evaluated without noise
    assert plain.train_losses[0][1] != noisy.train_losses[0][1]  # the first step already sees the noise
    a = load_file(str(plain.out_dir / "adapter_model.safetensors"))
    b = load_file(str(noisy.out_dir / "adapter_model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # the returned model carries no hook: training mode is deterministic (no dropout), as the saved adapter is
    model = trained("neftune").model
    model.train()
    with torch.no_grad():
        first, second = (model(input_ids=torch.tensor([IDS])).logits for _ in range(2))
    model.eval()
    assert torch.equal(first, second)


def test_rslora_scales_by_sqrt_rank(trained, runner_model):
    from loraplex.adapters.loader import load_adapter_dir

    result = trained("rslora")
    config = json.loads((result.out_dir / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["r"] == RANK
    weights = load_adapter_dir(result.out_dir, runner_model[0], max_rank=64, dtype=torch.float32)
    scales = [d.scale for d in weights.modules.values()]
    assert len(scales) == 4 * 7 and scales == pytest.approx([config["lora_alpha"] / RANK**0.5] * len(scales))


def test_loha_lokr_ranks_are_the_served_ranks(trained):
    assert set(trained("loha").ranks.values()) == {RANK * RANK}
    # tiny model: q/o [128, 128] -> W1 [8, 8] full (rank 8) ⊗ W2 [16, 16] at rank 4; down [128, 320] -> both at rank 4
    lokr = trained("lokr").ranks
    assert lokr["model.layers.0.self_attn.q_proj"] == 8 * RANK and lokr["model.layers.0.mlp.down_proj"] == RANK * RANK


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(init="loftq"), "init must be one of"),
        (dict(adapter_type="dora", init="pissa"), "init 'pissa' is for types"),
        (dict(adapter_type="vera", init="gaussian"), "init 'gaussian' is for types"),
        (dict(adapter_type="loha", rslora=True), "rsLoRA is for types"),
        (dict(adapter_type="lora+", lora_fa=True), "LoRA-FA is for type 'lora'"),
        (dict(neftune_alpha=-1.0), "neftune_alpha"),
        (dict(neftune_alpha=float("nan")), "neftune_alpha"),
    ],
)
def test_config_rejects_bad_variants(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(model="m", data="d.jsonl", out="o", **kwargs)


def test_cli_flags_reach_the_config():
    import argparse

    from loraplex.adapters.train.cli import add_train_arguments, config_from_args

    parser = add_train_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--model", "m", "--data", "d", "--out", "o", "--init", "olora", "--rslora", "--lora-fa",
                              "--neftune-alpha", "5"])  # fmt: skip
    cfg = config_from_args(args)
    assert (cfg.init, cfg.rslora, cfg.lora_fa, cfg.neftune_alpha, cfg.dense_base) == ("olora", True, True, 5.0, True)
    for kind in ("loha", "lokr"):
        cfg = config_from_args(parser.parse_args(["--model", "m", "--data", "d", "--out", "o", "--type", kind]))
        assert cfg.adapter_type == kind and cfg.rank == 8 and cfg.dense_base


def test_a_served_rank_over_the_servers_default_is_warned_about(tiny_model_dir, pair_data, tmp_path, caplog):
    # LoKr r=8 on the tiny q_proj: W1 [8, 8] and W2 [16, 16] stay full (r is not under half their size): rank 8·16
    cfg = _config(tiny_model_dir, pair_data, tmp_path / "lokr", adapter_type="lokr", rank=8, target_modules=("q_proj",),
                  max_steps=1, save_every=0, eval_fraction=0.0)  # fmt: skip
    with caplog.at_level("WARNING", logger="loraplex.train"):
        result = train(cfg)
    assert set(result.ranks.values()) == {128}
    assert "serves at rank up to 128, over the server's default --max-rank 64" in caplog.text
