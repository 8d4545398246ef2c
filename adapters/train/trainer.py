"""The training loop: QLoRA-style adapters on the server's NF4 base, written in PEFT's format.

    result = train(TrainConfig(model=DIR, data=FILE, out=DIR, adapter_type="lora+"))

The base is loaded from a Hugging Face model directory (float32 on CPU, bfloat16 on
CUDA), its decoder linears replaced by bitsandbytes NF4 layers with
`quantize_hf_decoder_` — the function the server quantizes its base with, so an adapter
serves on the same 4-bit weights it trained on — and frozen. LoHa, LoKr and the PiSSA/OLoRA
inits train on those NF4 weights dequantized into plain float linears (the same matrices;
PEFT cannot put them on 4-bit layers: variants.py says why). PEFT injects the adapter
(LoRA, DoRA, VeRA, AdaLoRA, LoHa, LoKr; optionally rsLoRA scaling and gaussian/PiSSA/OLoRA
init; adapter weights stay float32), PEFT's `create_loraplus_optimizer` gives LoRA+ its two
learning rates and `create_lorafa_optimizer` LoRA-FA its frozen A and projected B update,
AdaLoRA's rank allocator runs after every optimizer step, and NEFTune's noise, when asked
for, is added to the input embeddings in training mode only. The output directory receives
adapter_config.json + adapter_model.safetensors (AdaLoRA's pruned to its final ranks by
PEFT's save, which cuts every module down to its rank_pattern; PiSSA/OLoRA's converted to a
plain LoRA of rank 2r that serves on the unmodified base), training_run.json and
loss_curve.png; checkpoint-STEP/ subfolders hold intermediate adapters (converted alike).

This module knows nothing about argparse, the server's RPCs or the engine (but its default
--max-rank, to warn of an adapter that would not serve under it).
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from loraplex.adapters.form import DEFAULT_MAX_RANK
from loraplex.adapters.train import data as D
from loraplex.adapters.train.config import BASE_MODIFYING_INITS, TrainConfig
from loraplex.adapters.train.variants import AdapterSaver, dense_nf4_decoder_, neftune
from loraplex.server.model.quantize import quantize_hf_decoder_

log = logging.getLogger("loraplex.train")
SERVER_MAX_RANK = DEFAULT_MAX_RANK  # the server's default --max-rank

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
RUN_FILE = "training_run.json"
CURVE_FILE = "loss_curve.png"


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    train_losses: list[tuple[int, float]]  # (step, mean CE per completion token over that step's batch)
    eval_losses: list[tuple[int, float]]  # (step, mean CE per token of the eval split); step 0 = before training; [] without eval split
    tokens_per_s: float  # real (non-padding) training tokens per second of training time
    train_tokens: int
    wall_s: float
    trainable_params: int
    ranks: dict[str, int]  # rank per adapted module as served (AdaLoRA: after pruning; LoHa r·r; PiSSA/OLoRA 2r)
    run: dict  # the content of training_run.json
    model: Any = field(repr=False, default=None)  # the trained PeftModel, in memory, eval mode
    optimizer: Any = field(repr=False, default=None)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_quantized_base(model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer): the HF causal LM in `dtype` on `device`, its decoder linears in
    NF4 exactly as the server quantizes them (quantized on `device`), frozen, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    model.to(device)
    quantize_hf_decoder_(model, dtype)
    model.requires_grad_(False)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return model, tokenizer


def peft_config(cfg: TrainConfig, total_steps: int):
    """The PEFT config of the adapter type; AdaLoRA's total_step is the run's step count."""
    from peft import AdaLoraConfig, LoHaConfig, LoKrConfig, LoraConfig, VeraConfig

    common = dict(target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    if cfg.adapter_type in ("lora", "lora+", "dora"):
        return LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
            use_dora=cfg.adapter_type == "dora", use_rslora=cfg.rslora,
            init_lora_weights=True if cfg.init == "default" else cfg.init, **common,
        )
    if cfg.adapter_type == "vera":
        return VeraConfig(r=cfg.rank, vera_dropout=cfg.dropout, projection_prng_key=cfg.seed, save_projection=True, **common)
    if cfg.adapter_type == "loha":
        return LoHaConfig(r=cfg.rank, alpha=cfg.alpha, rank_dropout=cfg.dropout, **common)
    if cfg.adapter_type == "lokr":
        # both Kronecker factors low-rank (where r is under half their size): the server's rank is then r·r
        return LoKrConfig(r=cfg.rank, alpha=cfg.alpha, rank_dropout=cfg.dropout, decompose_both=True, **common)
    return AdaLoraConfig(
        init_r=cfg.init_r, target_r=cfg.target_r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        tinit=cfg.tinit, tfinal=cfg.tfinal, deltaT=cfg.delta_t, beta1=cfg.beta1, beta2=cfg.beta2,
        orth_reg_weight=cfg.orth_reg_weight, total_step=total_steps, **common,
    )


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; for LoRA+ PEFT's LoRA+ groups (B at λ·lr); for
    LoRA-FA PEFT's LoraFAOptimizer, which freezes every lora_A (requires_grad off) and
    updates B with the gradient projected as LoRA-FA's paper says."""
    if cfg.lora_fa:
        from peft.optimizers import create_lorafa_optimizer

        return create_lorafa_optimizer(model, r=cfg.rank, lora_alpha=cfg.alpha, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.adapter_type == "lora+":
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(
            model, torch.optim.AdamW, lr=cfg.lr, loraplus_lr_ratio=cfg.loraplus_ratio,
            loraplus_weight_decay=cfg.weight_decay,
        )
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_multiplier(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """LR factor for 0-based optimizer step `step`: linear warmup to 1 over `warmup`
    steps, then constant or cosine decay reaching min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def token_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross entropy over labelled positions. logits [B, L, V], labels [B, L]."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=D.IGNORE_INDEX, reduction="sum"
    )


@torch.no_grad()
def evaluate(model, examples: list[D.TokenizedExample], batch_size: int, pad_id: int, device) -> float:
    """Mean CE per labelled token over `examples` (no regularizers); nan when empty."""
    if not examples:
        return float("nan")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in D.batches(examples, batch_size, pad_id):
        batch = batch.to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        total += token_ce_sum(logits, batch.labels).item()
        count += batch.num_label_tokens
    model.train(was_training)
    return total / max(1, count)


def saved_ranks(adapter_dir: str | Path) -> dict[str, int]:
    """Rank per module at which the server serves a saved PEFT adapter, read from its
    safetensors header: lora_A rows for LoRA, DoRA and AdaLoRA; the length of λ_d for VeRA;
    r·r for LoHa; rank(W1)·rank(W2) for LoKr (a factored W's r, a full one's smaller side)."""
    from safetensors import safe_open

    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), framework="pt") as f:
        shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}

    def lokr_rank(module: str, w: str) -> int:
        full = shapes.get(f"{module}.lokr_{w}")
        return min(full) if full is not None else shapes[f"{module}.lokr_{w}_a"][1]

    ranks = {}
    for key, shape in shapes.items():
        module, _, suffix = key.partition(".lora_A")  # AdaLoRA's lora_A has no ".weight"
        if suffix in ("", ".weight") and module != key:
            ranks[module] = shape[0]
        elif key.endswith(".vera_lambda_d"):
            ranks[key.removesuffix(".vera_lambda_d")] = shape[0]
        elif key.endswith(".hada_w1_a"):
            ranks[key.removesuffix(".hada_w1_a")] = shape[1] * shapes[key.replace("hada_w1_a", "hada_w2_a")][1]
        elif key.endswith((".lokr_w1", ".lokr_w1_a")):
            module = key.rpartition(".lokr_w1")[0]
            ranks[module] = lokr_rank(module, "w1") * lokr_rank(module, "w2")
    return {k.removeprefix("base_model.model."): v for k, v in ranks.items()}


def train(cfg: TrainConfig) -> TrainResult:
    """Trains one adapter as `cfg` says and writes it to cfg.out. See the module docstring."""
    from peft import get_peft_model

    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    out = Path(cfg.out)

    # data first: a bad file fails before the model loads
    examples = D.read_jsonl(cfg.data)
    train_raw, eval_raw = D.split(examples, cfg.eval_fraction, cfg.seed)
    model, tokenizer = load_quantized_base(cfg.model, device, dtype)
    if cfg.dense_base:
        dense_nf4_decoder_(model, dtype)
    train_set, dropped = D.tokenize_report(train_raw, tokenizer, cfg.max_seq_len)
    eval_set, dropped_eval = D.tokenize_report(eval_raw, tokenizer, cfg.max_seq_len)
    if dropped or dropped_eval:
        log.warning("dropped %d examples whose completion lies beyond max_seq_len=%d", dropped + dropped_eval, cfg.max_seq_len)
    pad_id = D.pad_id_of(tokenizer)
    total_steps = _total_steps(cfg, len(train_set))
    if cfg.adapter_type == "adalora" and cfg.tinit + cfg.tfinal >= total_steps:
        raise ValueError(
            f"AdaLoRA needs a budgeting phase: tinit ({cfg.tinit}) + tfinal ({cfg.tfinal}) must be < "
            f"the number of steps ({total_steps})"
        )
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * total_steps)

    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(cfg.seed)
    model = get_peft_model(model, peft_config(cfg, total_steps))
    saver = AdapterSaver(model, convert=cfg.init in BASE_MODIFYING_INITS)  # PiSSA/OLoRA: the initial adapter, now
    try:
        optimizer = make_optimizer(model, cfg)  # LoRA-FA's freezes A: count the trainable parameters after it
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info(
            "training %s on %s (%s): %d train / %d eval examples, %d steps, %d trainable parameters",
            cfg.adapter_type, device, str(dtype).removeprefix("torch."), len(train_set), len(eval_set), total_steps,
            trainable,
        )
        with neftune(model, cfg.neftune_alpha):  # training mode only: evaluate() and the save run in eval mode
            train_losses, eval_losses, train_tokens, train_time = _run_steps(
                cfg, model, optimizer, saver, train_set, eval_set, pad_id, device, total_steps, warmup, out
            )
        model.eval()
        saver.save(model, out)
    finally:
        saver.close()
    is_adalora = cfg.adapter_type == "adalora"
    ranks = saved_ranks(out)
    if ranks and max(ranks.values()) > SERVER_MAX_RANK:  # LoHa's r·r, LoKr's rank(W1)·rank(W2) grow fast
        log.warning("the adapter serves at rank up to %d, over the server's default --max-rank %d: serve it with "
                    "--max-rank %d or more, or train a smaller --rank", max(ranks.values()), SERVER_MAX_RANK,
                    max(ranks.values()))
    if is_adalora:
        budget = cfg.target_r * len(ranks)
        if sum(ranks.values()) > budget:  # PEFT's save prunes by rank_pattern; this guards that contract
            raise RuntimeError(f"AdaLoRA saved {sum(ranks.values())} ranks in total, over its budget {budget}")
    wall = time.perf_counter() - t_start
    tokens_per_s = train_tokens / max(train_time, 1e-9)
    run = _run_record(cfg, device, dtype, total_steps, warmup, len(train_set), len(eval_set), trainable,
                      train_losses, eval_losses, train_tokens, train_time, tokens_per_s, wall, ranks)
    (out / RUN_FILE).write_text(json.dumps(run, indent=1) + "\n")
    plot_losses(out / CURVE_FILE, train_losses, eval_losses, title=f"{cfg.adapter_type} on {Path(cfg.model).name}")
    log.info("wrote %s (%.0f tok/s, %.1f s)", out, tokens_per_s, wall)
    return TrainResult(out, total_steps, train_losses, eval_losses, tokens_per_s, train_tokens, wall, trainable,
                       ranks, run, model, optimizer)


def _run_steps(cfg, model, optimizer, saver, train_set, eval_set, pad_id, device, total_steps, warmup, out):
    """The optimizer steps (with evals and checkpoints on the way) -> (train_losses,
    eval_losses, train_tokens, train_time)."""
    from tqdm.auto import tqdm

    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total_steps, warmup, cfg.schedule, cfg.min_lr_ratio)
    )
    params = [p for p in model.parameters() if p.requires_grad]
    is_adalora = cfg.adapter_type == "adalora"
    train_losses: list[tuple[int, float]] = []
    eval_losses: list[tuple[int, float]] = []
    if eval_set:
        eval_losses.append((0, evaluate(model, eval_set, cfg.batch_size, pad_id, device)))
        log.info("step 0 eval loss %.4f", eval_losses[0][1])
    stream = D.endless_batches(train_set, cfg.batch_size, pad_id, cfg.seed)
    train_time, train_tokens = 0.0, 0
    model.train()
    bar = tqdm(total=total_steps, desc=f"train {cfg.adapter_type}", unit="step", disable=not cfg.progress, dynamic_ncols=True)
    for step in range(1, total_steps + 1):
        t0 = time.perf_counter()
        micro = [next(stream).to(device) for _ in range(cfg.grad_accum)]
        step_label_tokens = sum(b.num_label_tokens for b in micro)
        ce_sum = torch.zeros((), device=device)
        for b in micro:
            outputs = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels, use_cache=False)
            # outputs.loss: mean CE over b's label tokens (+ AdaLoRA's orthogonality term); weighting by
            # b's share of the step's tokens makes the step's loss the mean over all its tokens
            (outputs.loss * (b.num_label_tokens / step_label_tokens)).backward()
            if is_adalora:
                ce_sum += token_ce_sum(outputs.logits.detach(), b.labels)
            else:
                ce_sum += outputs.loss.detach() * b.num_label_tokens
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        if is_adalora:  # after the step, before zero_grad (it reads the gradients); 1-based steps reach total_step
            model.base_model.update_and_allocate(step)
        optimizer.zero_grad(set_to_none=True)
        loss = ce_sum.item() / step_label_tokens  # .item() syncs, so the timing below is honest on CUDA
        train_time += time.perf_counter() - t0
        train_tokens += sum(b.num_tokens for b in micro)
        train_losses.append((step, loss))
        tps = train_tokens / max(train_time, 1e-9)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
        bar.update(1)
        if cfg.log_every and step % cfg.log_every == 0:
            log.info("step %d/%d loss %.4f lr %.2e tok/s %.0f", step, total_steps, loss, scheduler.get_last_lr()[0], tps)
        if eval_set and step < total_steps and cfg.eval_every and step % cfg.eval_every == 0:
            eval_losses.append((step, evaluate(model, eval_set, cfg.batch_size, pad_id, device)))
            log.info("step %d eval loss %.4f", step, eval_losses[-1][1])
        if cfg.save_every and step < total_steps and step % cfg.save_every == 0:
            ckpt = out / f"checkpoint-{step}"
            saver.save(model, ckpt)
            log.info("saved checkpoint %s", ckpt)
    bar.close()
    if eval_set:
        eval_losses.append((total_steps, evaluate(model, eval_set, cfg.batch_size, pad_id, device)))
        log.info("final eval loss %.4f", eval_losses[-1][1])
    return train_losses, eval_losses, train_tokens, train_time


def _total_steps(cfg: TrainConfig, n_train: int) -> int:
    if n_train == 0:
        raise D.DataError(f"{cfg.data}: no training examples left after the eval split and max_seq_len")
    steps_per_epoch = math.ceil(math.ceil(n_train / cfg.batch_size) / cfg.grad_accum)
    epochs = cfg.epochs_or_default
    total = cfg.max_steps if math.isinf(epochs) else max(1, math.ceil(epochs * steps_per_epoch))
    return min(total, cfg.max_steps) if cfg.max_steps is not None else total


def _run_record(cfg, device, dtype, total_steps, warmup, n_train, n_eval, trainable, train_losses, eval_losses,
                train_tokens, train_time, tokens_per_s, wall, ranks) -> dict:
    import bitsandbytes
    import peft
    import transformers

    return {
        "config": cfg.to_json(),
        "adapter_type": cfg.adapter_type,
        "base": {"model": cfg.model, "quantization": "nf4 (bitsandbytes, blocksize 64, double quant)"
                 + (", trained on as dequantized float linears" if cfg.dense_base else ""),
                 "dtype": str(dtype).removeprefix("torch.")},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "steps": total_steps,
        "warmup_steps": warmup,
        "train_examples": n_train,
        "eval_examples": n_eval,
        "trainable_params": trainable,
        "ranks": ranks,
        "total_rank": sum(ranks.values()),
        "train_losses": [[s, round(v, 6)] for s, v in train_losses],
        "eval_losses": [[s, round(v, 6)] for s, v in eval_losses],
        "final_train_loss": train_losses[-1][1] if train_losses else None,
        "final_eval_loss": eval_losses[-1][1] if eval_losses else None,
        "train_tokens": train_tokens,
        "train_time_s": round(train_time, 3),
        "tokens_per_s": round(tokens_per_s, 1),
        "wall_time_s": round(wall, 3),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "bitsandbytes": bitsandbytes.__version__},
    }


def plot_losses(path: Path, train_losses, eval_losses, title: str = "") -> None:
    """Train loss per step (and its moving average) and eval loss, as a PNG (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train_losses:
        steps, losses = zip(*train_losses)
        ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="train")
        k = max(1, len(losses) // 20)
        if k > 1:
            smooth = [sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1]) for i in range(len(losses))]
            ax.plot(steps, smooth, color="tab:blue", linewidth=1.5, label=f"train (mean of {k})")
    evals = [(s, v) for s, v in eval_losses if not math.isnan(v)]
    if evals:
        ax.plot(*zip(*evals), "o-", color="tab:orange", label="eval")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
