"""Trainer benchmark on a small generated task with a held-out split (the tiny model's
`pirate` demo task: sentence start -> the rest in pirate speak).

    python bench/train.py [--steps 150] [--examples 800] [--device auto] [--out bench/results/train.json]

1. LoRA+ vs LoRA: same lr for A (LoRA+ gives B λ·lr), same steps and schedule; how many
   steps LoRA+ needs to reach the eval loss LoRA ends with.
2. AdaLoRA vs LoRA at the same parameter budget: AdaLoRA starts at init_r = 1.5 r and
   prunes to target_r = r on average (the saved adapter holds at most r·modules ranks, as
   LoRA r does); final eval losses. AdaLoRA's E starts at 0 and its A, B small, so it wants
   a larger lr: both run at each of --lr-mults × lr, and the best of each is compared.
3. Training tokens/s of every adapter type on CPU, and on CUDA when present (short runs,
   interleaved and repeated: a shared CPU's load changes under a benchmark).

Prints a table and writes JSON (and a PNG of the eval curves) under bench/results/.
Timings on a shared CPU are noisy: the JSON records the load average.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
from pathlib import Path

import torch

from loraplex.adapters.train.config import TrainConfig
from loraplex.adapters.train.demo import BUNDLED_MODEL, TASKS, make_examples, write_jsonl
from loraplex.adapters.train.trainer import train


def run(name: str, tmp: Path, data: Path, args, device: str, **overrides) -> dict:
    cfg = dict(
        model=str(args.model), data=str(data), out=str(tmp / name), adapter_type="lora", rank=args.rank,
        lr=args.lr, max_steps=args.steps, batch_size=args.batch_size, eval_fraction=args.eval_fraction,
        eval_every=args.eval_every, log_every=0, save_every=0, seed=args.seed, device=device, progress=False,
    )
    cfg.update(overrides)
    result = train(TrainConfig(**cfg))
    n_saved = _saved_params(result.out_dir)
    return {
        "name": name, "adapter_type": cfg["adapter_type"], "lr": cfg["lr"], "steps": result.steps,
        "device": result.run["device"], "trainable_params": result.trainable_params, "saved_params": n_saved,
        "total_rank": result.run["total_rank"], "eval_losses": result.eval_losses,
        "final_eval_loss": result.eval_losses[-1][1] if result.eval_losses else None, "tokens_per_s": result.tokens_per_s,
        "train_time_s": result.run["train_time_s"],
    }


def _saved_params(adapter_dir: Path) -> int:
    """Numbers in the saved adapter, less VeRA's shared frozen projections."""
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        total = 0
        for k in f.keys():
            if not k.startswith("base_model.vera_"):
                shape = f.get_slice(k).get_shape()
                total += int(torch.tensor(shape).prod()) if shape else 1
    return total


def steps_to_reach(eval_losses: list, target: float) -> int | None:
    return next((s for s, v in eval_losses if v <= target), None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    p.add_argument("--task", choices=sorted(TASKS), default="pirate")
    p.add_argument("--examples", type=int, default=800)
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3, help="LoRA's lr; LoRA+'s lr of A")
    p.add_argument("--loraplus-ratio", type=float, default=16.0)
    p.add_argument("--lr-mults", default="1,5", help="LoRA and AdaLoRA lrs, as multiples of --lr")
    p.add_argument("--throughput-steps", type=int, default=20, help="steps of each tokens/s run")
    p.add_argument("--throughput-repeats", type=int, default=3, help="tokens/s runs per type, interleaved; best and median kept")
    p.add_argument("--parts", default="quality,throughput", help="comma-separated: quality, throughput")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "train.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    parts = set(args.parts.split(","))
    mults = [float(m) for m in args.lr_mults.split(",")]
    load_before = os.getloadavg()[0]
    runs: dict[str, dict] = {}
    speed: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-train-") as tmp:
        tmp = Path(tmp)
        data = write_jsonl(make_examples(TASKS[args.task], args.examples, args.seed), tmp / "data.jsonl")
        for device in devices:
            tag = "" if device == "cpu" else "@cuda"
            if "quality" in parts:
                runs["lora" + tag] = run("lora" + tag, tmp, data, args, device)
                runs["lora+" + tag] = run("lora+" + tag, tmp, data, args, device, adapter_type="lora+",
                                          loraplus_ratio=args.loraplus_ratio)
                for mult in [m for m in mults if m != 1]:
                    name = f"lora lr×{mult:g}{tag}"
                    runs[name] = run(name, tmp, data, args, device, lr=args.lr * mult)
                for mult in mults:
                    name = f"adalora lr×{mult:g}{tag}"
                    runs[name] = run(name, tmp, data, args, device, adapter_type="adalora", lr=args.lr * mult,
                                     init_r=args.rank * 3 // 2, target_r=args.rank,
                                     tinit=args.steps // 10, tfinal=args.steps // 5)
            if "throughput" in parts:
                # tokens/s: short runs without eval, the types interleaved so load changes hit all alike
                types = {"lora": {}, "lora+": {}, "dora": {}, "vera": {"rank": 256}, "adalora": {"init_r": args.rank * 3 // 2}}
                for _ in range(args.throughput_repeats):
                    for t, extra in types.items():
                        r = run(f"speed-{t}", tmp, data, args, device, adapter_type=t, max_steps=args.throughput_steps,
                                eval_fraction=0.0, **extra)
                        entry = speed.setdefault(t + tag, {"device": r["device"], "tokens_per_s": []})
                        entry["tokens_per_s"].append(r["tokens_per_s"])
    load_after = os.getloadavg()[0]

    lines = []
    for device in devices:
        tag = "" if device == "cpu" else "@cuda"
        if "quality" in parts:
            lines += _quality_lines(runs, tag, args)
        if "throughput" in parts:
            lines.append(f"training tokens/s ({args.throughput_repeats} interleaved runs of {args.throughput_steps} steps, "
                         f"batch {args.batch_size}, rank {args.rank}, VeRA 256; best / median):")
            for name, e in speed.items():
                if _on(name, tag):
                    tps = sorted(e["tokens_per_s"])
                    lines.append(f"  {name:<14}{tps[-1]:>9,.0f} / {statistics.median(tps):>7,.0f}   [{e['device']}]")
        lines.append("")
    lines.append(f"load average {load_before:.1f} before, {load_after:.1f} after "
                 f"(cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()})")
    print("\n".join(lines))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "load_average": [load_before, load_after], "runs": runs, "tokens_per_s": speed, "table": lines}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    if runs:
        _plot(runs, args.out.with_suffix(".png"))
    print(f"wrote {args.out}" + (f" and {args.out.with_suffix('.png')}" if runs else ""))
    return 0


def _quality_lines(runs: dict, tag: str, args) -> list[str]:
    """The LoRA+ vs LoRA and AdaLoRA vs LoRA lines of one device."""
    lines = []
    lora, plus = runs["lora" + tag], runs["lora+" + tag]
    target = lora["final_eval_loss"]
    reach = steps_to_reach(plus["eval_losses"], target)
    plus["steps_to_lora_final_eval"] = reach
    lines.append(f"[{lora['device']}] task {args.task}: {args.examples} examples, {args.eval_fraction:.0%} held out; "
                 f"rank {args.rank}, batch {args.batch_size}, {args.steps} steps, warmup+cosine, lr {args.lr:g}")
    lines.append(f"{'run':<18}{'lr':>9}{'steps':>7}{'trainable':>11}{'saved':>9}{'ranks':>7}"
                 f"{'eval@0':>9}{'eval@mid':>10}{'final eval':>12}")
    for name, r in runs.items():
        if not _on(name, tag):
            continue
        ev = r["eval_losses"]
        mid = ev[len(ev) // 2] if len(ev) > 2 else None
        lines.append(
            f"{name:<18}{r['lr']:>9.2g}{r['steps']:>7}{r['trainable_params']:>11,}{r['saved_params']:>9,}"
            f"{r['total_rank']:>7}{ev[0][1]:>9.3f}{(f'{mid[1]:.3f}@{mid[0]}' if mid else '-'):>10}"
            f"{r['final_eval_loss']:>12.3f}"
        )
    if reach is None:
        lines.append(f"LoRA+ (λ={args.loraplus_ratio:g}) does not reach LoRA's final eval loss {target:.3f} "
                     f"in {args.steps} steps (its final: {plus['final_eval_loss']:.3f})")
    else:
        lines.append(f"LoRA+ (λ={args.loraplus_ratio:g}) reaches LoRA's final eval loss {target:.3f} at step {reach} "
                     f"of {args.steps} (eval every {args.eval_every}): {args.steps - reach} fewer steps, "
                     f"{args.steps / reach:.1f}x")
    best = {}
    for kind in ("lora", "adalora"):
        mine = [(r["final_eval_loss"], n) for n, r in runs.items() if _on(n, tag) and r["adapter_type"] == kind]
        best[kind] = runs[min(mine)[1]]
    a, b = best["adalora"], best["lora"]
    lines.append(f"same budget, best lr of each: {a['name']} final eval {a['final_eval_loss']:.3f} with "
                 f"{a['total_rank']} ranks saved ({a['saved_params']:,} numbers) vs {b['name']} "
                 f"{b['final_eval_loss']:.3f} with {b['total_rank']} ({b['saved_params']:,})")
    return lines


def _on(name: str, tag: str) -> bool:
    """Whether run `name` ran on the device of `tag` ("" = cpu, "@cuda")."""
    return name.endswith(tag) if tag else "@" not in name


def _plot(runs: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, r in runs.items():
        if len(r["eval_losses"]) > 2:
            ax.plot(*zip(*r["eval_losses"]), marker=".", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out cross entropy (nats / token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    raise SystemExit(main())
