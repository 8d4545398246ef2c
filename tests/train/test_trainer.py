"""The trainer on the bundled tiny model (CPU, a few steps each): every adapter type
learns and writes a PEFT adapter that gives the trained model's logits both in PEFT (on a
freshly quantized NF4 base) and in loraplex's model runner; LoRA+ gives B λ× A's learning
rate; AdaLoRA's saved ranks respect target_r in total; bad data names its line."""

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from loraplex.adapters.train import data as D
from loraplex.adapters.train.cli import main as cli_main
from loraplex.adapters.train.config import TrainConfig
from loraplex.adapters.train.trainer import load_quantized_base, lr_multiplier, make_optimizer, train

STEPS = 12
LORAPLUS_RATIO = 12.0  # not the default 16, so the test sees the flag reach the optimizer
ADALORA = dict(init_r=6, target_r=3, tinit=2, tfinal=3)  # budgeting on steps 3..9, fixed ranks after
TYPE_ARGS = {
    "lora": dict(lr=5e-3),
    "lora+": dict(lr=1e-3, loraplus_ratio=LORAPLUS_RATIO),
    "dora": dict(lr=5e-3),
    "vera": dict(lr=1e-1, rank=64),
    "adalora": dict(lr=2e-2, **ADALORA),
}
TYPES = list(TYPE_ARGS)
N_MODULES = 4 * 7  # tiny model: 4 layers x 7 target linears


@pytest.fixture(scope="module")
def trained(tiny_model_dir, pair_data, tmp_path_factory):
    """adapter type -> TrainResult, each trained once per module."""
    cache = {}

    def get(adapter_type):
        if adapter_type not in cache:
            cfg = TrainConfig(
                model=str(tiny_model_dir), data=str(pair_data), out=str(tmp_path_factory.mktemp(adapter_type) / "adapter"),
                adapter_type=adapter_type, max_steps=STEPS, batch_size=8, eval_fraction=0.25, eval_every=0,
                save_every=STEPS // 2, warmup_steps=1, progress=False, **TYPE_ARGS[adapter_type],
            )
            cache[adapter_type] = train(cfg)
        return cache[adapter_type]

    return get


def _probe_batch(tokenizer) -> D.Batch:
    examples = [D.Example("the old man", " likes the moon!!!"), D.Example("a dog sees", " the garden")]
    return D.collate(D.tokenize(examples, tokenizer, 64), D.pad_id_of(tokenizer))


@pytest.mark.parametrize("adapter_type", TYPES)
def test_trains_and_reloads_with_same_logits(adapter_type, trained, tiny_model_dir):
    from peft import PeftModel

    result = trained(adapter_type)
    # loss goes down: held-out loss before vs after, and the train loss of the first vs last steps
    (step0, before), (step_n, after) = result.eval_losses[0], result.eval_losses[-1]
    assert (step0, step_n) == (0, STEPS)
    assert after < 0.9 * before, result.eval_losses
    first = sum(v for _, v in result.train_losses[:3]) / 3
    last = sum(v for _, v in result.train_losses[-3:]) / 3
    assert last < first, result.train_losses

    out = result.out_dir
    for name in ("adapter_config.json", "adapter_model.safetensors", "training_run.json", "loss_curve.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin"))
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / f"checkpoint-{STEPS // 2}" / "adapter_model.safetensors").is_file()
    run = json.loads((out / "training_run.json").read_text())
    assert run["adapter_type"] == adapter_type and run["steps"] == STEPS
    assert len(run["train_losses"]) == STEPS and run["eval_losses"][0][0] == 0
    assert run["tokens_per_s"] > 0 and run["wall_time_s"] > 0
    assert run["config"]["lr"] == TYPE_ARGS[adapter_type]["lr"]
    peft_type = json.loads((out / "adapter_config.json").read_text())["peft_type"]
    assert peft_type == {"lora": "LORA", "lora+": "LORA", "dora": "LORA", "vera": "VERA", "adalora": "ADALORA"}[adapter_type]

    # the written adapter, loaded by PEFT on a freshly quantized base, gives the trained model's logits
    base, tokenizer = load_quantized_base(tiny_model_dir)
    batch = _probe_batch(tokenizer)
    with torch.no_grad():
        base_logits = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        reloaded = PeftModel.from_pretrained(base, str(out)).eval()
        got = reloaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        want = result.model.eval()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(got[mask], want[mask], atol=1e-4, rtol=1e-4)
    assert (want[mask] - base_logits[mask]).abs().max() > 1e-2  # the adapter does something


@pytest.mark.parametrize("adapter_type", TYPES)
def test_written_adapter_serves_in_loraplex_with_the_trained_logits(adapter_type, trained, runner_model):
    from loraplex.adapters.loader import load_adapter_dir
    from loraplex.server.model.llama import score_sequence

    runner_model, pages = runner_model
    result = trained(adapter_type)
    weights = load_adapter_dir(result.out_dir, runner_model, max_rank=64, dtype=torch.float32)
    assert weights.adapter_type == {"lora+": "lora"}.get(adapter_type, adapter_type)
    assert sum(d.rank for d in weights.modules.values()) <= sum(result.ranks.values())  # AdaLoRA: the pruned ranks
    pages.write(0, weights)
    ids = [1] + [b + 3 for b in b"the old man likes the moon"]  # byte ids follow the 3 specials
    with torch.no_grad():
        want = result.model.eval()(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(score_sequence(runner_model, ids, slot=0), want, atol=1e-4, rtol=1e-4)


def test_loraplus_gives_b_lambda_times_the_lr_of_a(trained):
    result = trained("lora+")
    group_of = {id(p): g for g in result.optimizer.param_groups for p in g["params"]}
    a_groups, b_groups = [], []
    for name, p in result.model.named_parameters():
        if p.requires_grad:
            (a_groups if "lora_A" in name else b_groups if "lora_B" in name else []).append(group_of[id(p)])
    assert len(a_groups) == len(b_groups) == N_MODULES
    lr = TYPE_ARGS["lora+"]["lr"]
    for g in a_groups:
        assert g["initial_lr"] == pytest.approx(lr)
    for g in b_groups:
        assert g["initial_lr"] == pytest.approx(LORAPLUS_RATIO * lr)
    # the schedule scales both alike: the ratio holds at every step (checked at the last one)
    assert b_groups[0]["lr"] == pytest.approx(LORAPLUS_RATIO * a_groups[0]["lr"])


def test_plain_lora_has_one_learning_rate(trained):
    result = trained("lora")
    assert {g["initial_lr"] for g in result.optimizer.param_groups} == {TYPE_ARGS["lora"]["lr"]}


def test_adalora_saved_ranks_respect_target_r_in_total(trained):
    result = trained("adalora")
    out = result.out_dir
    ranks = {}
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    for key, shape in shapes.items():
        if key.endswith(".lora_A"):
            module = key.removesuffix(".lora_A")
            ranks[module] = shape[0]
            assert shapes[module + ".lora_E"] == [shape[0], 1]
            assert shapes[module + ".lora_B"][1] == shape[0]
    assert len(ranks) == N_MODULES
    assert sum(ranks.values()) <= ADALORA["target_r"] * N_MODULES
    assert sum(ranks.values()) < ADALORA["init_r"] * N_MODULES  # pruned, not just saved at init_r
    config = json.loads((out / "adapter_config.json").read_text())
    pattern = {k.removesuffix(".lora_E"): sum(v) for k, v in config["rank_pattern"].items()}
    assert pattern == {k.removeprefix("base_model.model."): v for k, v in ranks.items()}
    assert result.ranks == {k.removeprefix("base_model.model."): v for k, v in ranks.items()}


def test_loraplus_optimizer_on_a_fresh_model(tiny_model_dir, pair_data, tmp_path):
    from peft import get_peft_model

    from loraplex.adapters.train.trainer import peft_config

    cfg = TrainConfig(model=str(tiny_model_dir), data=str(pair_data), out=str(tmp_path), adapter_type="lora+",
                      lr=3e-4, loraplus_ratio=16.0, target_modules=("q_proj", "v_proj"))
    base, _ = load_quantized_base(tiny_model_dir)
    model = get_peft_model(base, peft_config(cfg, total_steps=10))
    opt = make_optimizer(model, cfg)
    lrs = {}
    for g in opt.param_groups:
        for p in g["params"]:
            lrs[id(p)] = g["lr"]
    a = [lrs[id(p)] for n, p in model.named_parameters() if "lora_A" in n]
    b = [lrs[id(p)] for n, p in model.named_parameters() if "lora_B" in n]
    assert len(a) == len(b) == 4 * 2
    assert a == pytest.approx([3e-4] * len(a)) and b == pytest.approx([16 * 3e-4] * len(b))


def test_cli_trains_text_data(tiny_model_dir, text_data, tmp_path, capsys):
    out = tmp_path / "cli-adapter"
    rc = cli_main([
        "--model", str(tiny_model_dir), "--data", str(text_data), "--type", "lora", "--out", str(out),
        "--max-steps", "3", "--batch-size", "4", "--target-modules", "q_proj,v_proj", "--rank", "4",
        "--no-progress", "--save-every", "0", "--eval-fraction", "0",
    ])
    assert rc == 0
    assert "adapter written to" in capsys.readouterr().out
    run = json.loads((out / "training_run.json").read_text())
    assert run["eval_examples"] == 0 and run["eval_losses"] == [] and run["final_eval_loss"] is None
    assert run["train_examples"] == 24 and run["steps"] == 3
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["target_modules"]) == {"q_proj", "v_proj"}
    assert not list(out.glob("checkpoint-*"))


def test_cli_reports_bad_data_with_line_number(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n\n{"prompt": "p", "completion": 3}\n')
    rc = cli_main(["--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
    assert f"{data}:3: 'completion' must be a string" in capsys.readouterr().err


def test_module_help():
    proc = subprocess.run([sys.executable, "-m", "loraplex.adapters.train", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "--loraplus-ratio" in proc.stdout and "--upload" in proc.stdout and "--target-r" in proc.stdout and "--tls-ca" in proc.stdout
    assert all(flag in proc.stdout for flag in ("loha", "lokr", "--init", "--rslora", "--lora-fa", "--neftune-alpha"))
    assert "dequantized" in proc.stdout  # why LoHa/LoKr/PiSSA/OLoRA need a dense base


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"input": "x"}', "needs a 'text' key or 'prompt' and 'completion'"),
        ('{"text": "x", "prompt": "p", "completion": "c"}', "not both"),
        ('{"prompt": "p"}', "has no 'completion' key"),
        ('{"prompt": 1, "completion": "c"}', "'prompt' must be a string"),
        ('{"prompt": "p", "completion": ""}', "'completion' is empty"),
        ('{"text": ""}', "'text' must be a non-empty string"),
    ],
)
def test_bad_lines_name_their_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(D.DataError) as err:
        D.read_jsonl(path)
    assert f"{path}:2: " in str(err.value) and message in str(err.value)


def test_empty_or_missing_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n  \n")
    with pytest.raises(D.DataError, match="no examples"):
        D.read_jsonl(tmp_path / "e.jsonl")
    with pytest.raises(D.DataError, match="no such file"):
        D.read_jsonl(tmp_path / "missing.jsonl")


def test_tokenize_masks_the_prompt_and_appends_eos(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    pair, text = D.tokenize([D.Example("ab", "cde"), D.Example("", "xy")], tok, 64)
    prompt_ids = tok("ab")["input_ids"]  # <s> a b
    completion_ids = tok("cde", add_special_tokens=False)["input_ids"]
    assert list(pair.input_ids) == prompt_ids + completion_ids + [tok.eos_token_id]
    assert list(pair.labels) == [D.IGNORE_INDEX] * len(prompt_ids) + completion_ids + [tok.eos_token_id]
    assert pair.num_label_tokens == len(completion_ids) + 1
    assert text.input_ids[0] == tok.bos_token_id and text.labels[0] == D.IGNORE_INDEX
    assert list(text.labels[1:]) == list(text.input_ids[1:])
    # a prompt that fills max_seq_len leaves nothing to learn: the example is dropped
    kept, dropped = D.tokenize_report([D.Example("a long prompt", "x"), D.Example("a", "b")], tok, 5)
    assert dropped == 1 and len(kept) == 1 and len(kept[0].input_ids) == 4

    batch = D.collate([pair, text], D.pad_id_of(tok))
    assert batch.input_ids.shape == (2, len(pair.input_ids))
    n = len(text.input_ids)
    assert (batch.input_ids[1, n:] == tok.pad_token_id).all() and (batch.labels[1, n:] == D.IGNORE_INDEX).all()
    assert batch.attention_mask.sum() == len(pair.input_ids) + n


def test_split_is_seeded_and_holds_out_at_least_one():
    train_a, eval_a = D.split(range(10), 0.01, seed=3)
    train_b, eval_b = D.split(range(10), 0.01, seed=3)
    assert (train_a, eval_a) == (train_b, eval_b) and len(eval_a) == 1 and sorted(train_a + eval_a) == list(range(10))
    assert D.split(range(10), 0.0, seed=3)[1] == []


def test_warmup_then_cosine():
    assert [lr_multiplier(s, 10, 2, "cosine", 0.0) for s in (0, 1)] == [0.5, 1.0]
    assert lr_multiplier(2, 10, 2, "cosine", 0.0) == 1.0
    assert lr_multiplier(6, 10, 2, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_multiplier(10, 10, 2, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(7, 10, 2, "constant", 0.0) == 1.0
    assert all(math.isfinite(lr_multiplier(s, 1, 0, "cosine", 0.0)) for s in range(3))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(adapter_type="qlora"), "adapter type"),
        (dict(target_modules=("q_proj", "lm_head")), "target modules"),
        (dict(loraplus_ratio=0.5), "LoRA\\+ ratio"),
        (dict(adapter_type="adalora", init_r=4, target_r=8), "target_r <= init_r"),
        (dict(adapter_type="adalora", tinit=5, tfinal=5, max_steps=10), "budgeting phase"),
        (dict(max_steps=0), "max_steps"),
        (dict(eval_fraction=1.0), "eval_fraction"),
        (dict(device="tpu"), "device"),
    ],
)
def test_config_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(model="m", data="d.jsonl", out="o", **kwargs)


def test_config_defaults():
    assert TrainConfig(model="m", data="d", out="o").rank == 8
    assert TrainConfig(model="m", data="d", out="o").alpha == 16.0
    assert TrainConfig(model="m", data="d", out="o", adapter_type="vera").rank == 256
    assert TrainConfig(model="m", data="d", out="o", adapter_type="adalora").alpha == 24.0  # 2 * init_r
