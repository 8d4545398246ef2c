"""Makes the demo adapters bundled with the default server, from data made here.

    python -m loraplex.adapters.train.demo --out loraplex/assets/adapters

Each task turns sentences of the tiny model's own pretraining corpus
(`server.model.tiny.corpus_sentence`) into prompt/completion pairs: the prompt is the
start of a sentence (or a whole sentence), the completion the rest of it (or the next
sentence) rewritten in the task's style, then EOS. The base model rambles on from
sentence to sentence; each adapter finishes the sentence in its own way and stops
(greedy, bundled adapters):

    base             the cat sees -> " the red ball at night. the teacher foll..."
    shout   (LoRA+)  the cat sees -> " the river again!!!"
    pirate  (DoRA)   the cat sees -> " ye sea again arr!"

Each adapter is trained with `trainer.train` on the NF4 base, then checked by greedy
generation with PEFT: its outputs must differ from the base's and from each other's.
Only adapter_config.json, adapter_model.safetensors, training_run.json and a README.md
are kept in each out/<name>/ (no checkpoints, no PNG), so the repo stays small.
Same seed, same library versions, same CPU kind -> the same adapters.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import loraplex
from loraplex.server.model.tiny import corpus_sentence

BUNDLED_MODEL = Path(loraplex.__file__).resolve().parent / "assets" / "tiny-llama"
BUNDLED_MODEL_NAME = "loraplex/assets/tiny-llama"  # how the bundled base is named in the written files
KEEP = ("adapter_config.json", "adapter_model.safetensors", "training_run.json")
SAMPLE_PROMPTS = ("the cat sees", "my sister paints", "a small bird watches the river")

# Only bytes the tiny model saw in pretraining (its corpus is lowercase letters, spaces and
# periods): the embeddings and lm_head rows of unseen bytes (uppercase, most punctuation) are
# untrained, and an adapter on the decoder linears alone learns to emit them only slowly.
# One new byte ("!") is easy enough.
_PIRATE_WORDS = {
    "the": "ye", "my": "me", "sees": "spies", "likes": "loves", "finds": "grabs", "watches": "eyes",
    "follows": "chases", "today": "this day", "house": "ship", "river": "sea", "man": "sailor",
    "garden": "island", "park": "port",
}


def shout(words: list[str]) -> str:
    return " ".join(words).rstrip(".") + "!!!"


def pirate(words: list[str]) -> str:
    return " ".join(_PIRATE_WORDS.get(w.rstrip("."), w.rstrip(".")) for w in words) + " arr!"


@dataclass(frozen=True)
class DemoTask:
    name: str
    adapter_type: str
    transform: Callable[[list[str]], str]  # the words of the rest of a sentence -> the completion text
    description: str
    train: dict = field(default_factory=dict)  # TrainConfig overrides


TASKS = {
    "shout": DemoTask(
        "shout", "lora+", shout, "finishes the sentence with '!!!' instead of '.' and stops",
        dict(rank=8, lr=2e-3, loraplus_ratio=16.0, max_steps=200),
    ),
    "pirate": DemoTask(
        "pirate", "dora", pirate, "finishes the sentence in pirate speak (ye, spies, grabs, ship, ...), adds ' arr!' and stops",
        dict(rank=8, lr=1e-2, max_steps=200),
    ),
}


def make_examples(task: DemoTask, n: int, seed: int) -> list[dict]:
    """n prompt/completion pairs of `task`: a sentence prefix (or a whole sentence) as the
    prompt, the rest of the sentence (or the next sentence) in the task's style."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = corpus_sentence(rng).split(" ")
        if rng.random() < 0.2:  # whole sentence in, a new sentence out
            prompt, rest = " ".join(words), corpus_sentence(rng).split(" ")
        else:
            k = rng.randint(1, len(words) - 1)
            prompt, rest = " ".join(words[:k]), words[k:]
        rows.append({"prompt": prompt, "completion": " " + task.transform(rest)})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 40) -> str:
    """The greedy continuation of `prompt` (decoded, special tokens dropped)."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def sample_outputs(model_dir: Path, adapter_dirs: dict[str, Path], prompts=SAMPLE_PROMPTS) -> dict[str, dict[str, str]]:
    """{prompt: {"base": text, name: text, ...}}: greedy outputs of the NF4 base and of
    each adapter loaded with PEFT on it."""
    from peft import PeftModel

    from loraplex.adapters.train.trainer import load_quantized_base

    base, tokenizer = load_quantized_base(model_dir)
    table = {p: {"base": greedy(base, tokenizer, p)} for p in prompts}
    for name, path in adapter_dirs.items():
        model, _ = load_quantized_base(model_dir)
        model = PeftModel.from_pretrained(model, str(path)).eval()
        for p in prompts:
            table[p][name] = greedy(model, tokenizer, p)
    return table


def build(out_root: Path, names: list[str], model_dir: Path = BUNDLED_MODEL, seed: int = 0,
          n_examples: int = 2000, steps: int | None = None, progress: bool = True) -> dict[str, Path]:
    """Trains the named demo adapters into out_root/<name>/ and returns their directories."""
    from loraplex.adapters.train.config import TrainConfig
    from loraplex.adapters.train.trainer import train

    model_name = BUNDLED_MODEL_NAME if Path(model_dir).resolve() == BUNDLED_MODEL else str(model_dir)
    dirs = {}
    with tempfile.TemporaryDirectory(prefix="loraplex-demo-") as tmp:
        for name in names:
            task = TASKS[name]
            data = write_jsonl(make_examples(task, n_examples, seed), Path(tmp) / f"{name}.jsonl")
            overrides = dict(task.train, **({"max_steps": steps} if steps else {}))
            cfg = TrainConfig(
                model=str(model_dir), data=str(data), out=str(Path(tmp) / name), adapter_type=task.adapter_type,
                batch_size=16, eval_fraction=0.05, eval_every=100, warmup_ratio=0.05, seed=seed, progress=progress,
                **overrides,
            )
            result = train(cfg)
            dest = Path(out_root) / name
            if dest.exists():
                shutil.rmtree(dest)
            dest.mkdir(parents=True)
            for f in KEEP:
                shutil.copyfile(result.out_dir / f, dest / f)
            _rename_paths(dest, model_name, name, task, seed, n_examples)
            dirs[name] = dest
    return dirs


def _rename_paths(dest: Path, model_name: str, name: str, task: DemoTask, seed: int, n: int) -> None:
    """Machine-independent paths in the kept files (the temp data dir means nothing elsewhere)."""
    config = json.loads((dest / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = model_name
    (dest / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    run = json.loads((dest / "training_run.json").read_text())
    run["config"].update(model=model_name, out=f"loraplex/assets/adapters/{name}",
                         data=f"generated by loraplex.adapters.train.demo (task {name}, seed {seed}, {n} examples)")
    run["base"]["model"] = model_name
    (dest / "training_run.json").write_text(json.dumps(run, indent=1) + "\n")


def write_readme(dest: Path, task: DemoTask, samples: dict[str, dict[str, str]]) -> None:
    run = json.loads((dest / "training_run.json").read_text())
    examples = make_examples(task, 3, seed=123)
    lines = [
        f"# `{task.name}` — a {task.adapter_type} demo adapter for the bundled tiny model",
        "",
        f"What it does: {task.description}.",
        "",
        "Made by `python -m loraplex.adapters.train.demo --out loraplex/assets/adapters` (adapters/train/demo.py),",
        "which generates its own data from the tiny model's corpus and trains with loraplex's trainer on the",
        "NF4-quantized base (the server's quantization). Re-running it retrains this adapter from the same",
        "data and seed (bit-identical weights need the same library versions and CPU kind).",
        "",
        f"- type: {task.adapter_type}; rank {run['config']['rank']}; alpha {run['config']['alpha']}; "
        f"targets: {', '.join(run['config']['target_modules'])}",
        f"- {run['steps']} steps, batch {run['config']['batch_size']}, lr {run['config']['lr']}"
        + (f", LoRA+ λ {run['config']['loraplus_ratio']}" if task.adapter_type == "lora+" else "")
        + f", seed {run['config']['seed']}; eval loss {run['eval_losses'][0][1]:.3f} -> {run['final_eval_loss']:.3f}",
        f"- trained on {run['device']} in {run['wall_time_s']:.0f} s ({run['tokens_per_s']:.0f} training tokens/s)",
        "",
        "Training pairs look like:",
        "",
        *[f"    {json.dumps(e)}" for e in examples],
        "",
        "Greedy outputs (PEFT on the NF4 base, 40 new tokens at most):",
        "",
        "| prompt | base | this adapter |",
        "|---|---|---|",
        *[f"| `{p}` | `{_cell(row['base'])}` | `{_cell(row[task.name])}` |" for p, row in samples.items()],
        "",
    ]
    (dest / "README.md").write_text("\n".join(lines))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loraplex.adapters.train.demo",
        description="Train the demo adapters bundled with the default server (data generated here).",
    )
    parser.add_argument("--out", type=Path, required=True, help="adapter root, e.g. loraplex/assets/adapters")
    parser.add_argument("--only", nargs="+", choices=sorted(TASKS), default=list(TASKS), help="which adapters")
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL, help="base model directory (default: bundled tiny model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=2000, help="generated pairs per task")
    parser.add_argument("--steps", type=int, default=None, help="override each task's step count")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    dirs = build(args.out, args.only, args.model, args.seed, args.examples, args.steps, not args.no_progress)
    samples = sample_outputs(args.model, dirs)
    failures = []
    for name, dest in dirs.items():
        write_readme(dest, TASKS[name], samples)
    for prompt, row in samples.items():
        print(f"\nprompt: {prompt!r}")
        for who, text in row.items():
            print(f"  {who:>8}: {text!r}")
        outs = list(row.values())
        if len(set(outs)) != len(outs):
            failures.append(prompt)
    if failures:
        print(f"\nFAILED: some adapters give the same output as the base or each other for {failures}")
        return 1
    print(f"\nwrote {', '.join(str(d) for d in dirs.values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
