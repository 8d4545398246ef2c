"""What each adapter family costs to serve, against a LoRA of the same served rank.

    python bench/families.py                          # tiny bundled model, CPU, ~1 min
    python bench/families.py --device cuda --rounds 5

Families, all made by PEFT on the bundled tiny model, all seven target modules, with
non-zero weights (perturbed as tests/support/peft_adapters.py does), each at served rank
16 (the rank of the one form, adapters/form.py, that the kernels see):

    lora      LoRA r=16                     rslora   rsLoRA r=16
    dora      DoRA r=16                     vera     VeRA r=16 (vera_form "shared")
    adalora   AdaLoRA init_r=16, no E zero  loha     LoHa r=4 (r·r = 16)
    lokr      LoKr r=2 (rank(W1)·r = 8·2)   mixture  two LoRA r=8, weights 0.5 / 0.5 (8 + 8)
    base      no adapter (reference)

Each family gets its own engine (cpu_threads=1 on CPU) with its adapter added
(`engine.adapters.add`); the engines are built first, then `--rounds` rounds run each
family's batch in turn (round-robin, so drift on a shared machine falls on every family
alike): N requests of T greedy new tokens (ignore_eos), all for that family's adapter,
submitted at once. Reported per family: tokens/s (median over rounds, and its interquartile
range: the CPU is shared, so read differences inside it as noise), decode-step time (the
median wall time of `engine.step` over the pure decode steps of every round; the step is
wrapped on the instance), and × LoRA (tokens/s, and step time, over LoRA r=16's). Served
ranks come from `engine.adapters.get(id).ranks`, the mixture's from the weights the engine
staged for it.
Speed is reported, never asserted.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    from bench import common  # python -m bench.families
except ImportError:
    import common  # python bench/families.py

import loraplex

TINY = Path(loraplex.__file__).parent / "assets" / "tiny-llama"
SUPPORT = Path(__file__).resolve().parent.parent / "tests" / "support" / "peft_adapters.py"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FAMILIES = ("base", "lora", "rslora", "dora", "vera", "adalora", "loha", "lokr", "mixture")
LYCORIS = ("loha", "lokr")  # PEFT 0.21 cannot wrap Linear4bit with these: built on the dequantized base
MIX_WEIGHTS = (0.5, 0.5)


def support_module():
    """tests/support/peft_adapters.py (the NF4 bases PEFT builds on), loaded by path (no sys.path edit)."""
    spec = importlib.util.spec_from_file_location("peft_adapters", SUPPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peft_config(kind: str):
    """Each family at served rank 16 on every target module."""
    from peft import AdaLoraConfig, LoHaConfig, LoKrConfig, LoraConfig, VeraConfig

    if kind == "lora":
        return LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
    if kind == "rslora":
        return LoraConfig(r=16, lora_alpha=32, use_rslora=True, target_modules=TARGETS, init_lora_weights=False)
    if kind == "dora":
        return LoraConfig(r=16, lora_alpha=32, use_dora=True, target_modules=TARGETS, init_lora_weights=False)
    if kind == "vera":
        return VeraConfig(r=16, target_modules=TARGETS, save_projection=True, projection_prng_key=7)
    if kind == "adalora":  # never stepped through update_and_allocate: nothing pruned, every E row kept
        return AdaLoraConfig(init_r=16, target_r=16, lora_alpha=32, total_step=10, target_modules=TARGETS)
    if kind == "loha":  # served rank r·r
        return LoHaConfig(r=4, alpha=8, target_modules=TARGETS)
    if kind == "lokr":  # W1 full (rank 8 on every module of the tiny model), W2 factored at r=2: 8·2
        return LoKrConfig(r=2, alpha=4, target_modules=TARGETS)
    if kind == "mixture_part":
        return LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
    raise ValueError(kind)


def save_adapter(support, kind: str, out: Path, seed: int) -> None:
    """A PEFT adapter of `kind`, its zero-initialised factors made non-zero, saved to `out`."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    base = support.nf4_dense_base() if kind in LYCORIS else support.nf4_base()
    model = get_peft_model(base, peft_config(kind))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "hada_" in name:  # PEFT leaves hada_w2_b at 0
                p.copy_(torch.randn_like(p) * 0.23)
            elif "lokr_" in name:  # PEFT leaves lokr_w1 at 0
                p.copy_(torch.randn_like(p) * (0.05 if ".lokr_w1." in name else 0.3))
            elif "vera_lambda" in name:  # λ_b starts at 0
                p.copy_(torch.randn_like(p) * 0.5 + 0.5)
            elif kind == "adalora" and "lora_E" in name:  # starts at 0; |E| ≥ 0.1: no row reads as pruned
                p.copy_((0.1 + torch.rand_like(p)) * torch.where(torch.rand_like(p) < 0.5, -1.0, 1.0))
            elif kind == "adalora" and ("lora_A" in name or "lora_B" in name):
                p.copy_(torch.randn_like(p) * 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
            elif "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(out), safe_serialization=True)


def make_adapters(root: Path) -> dict[str, list[Path]]:
    """family -> the adapter directories it serves (two for the mixture, none for base)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    support = support_module()
    dirs: dict[str, list[Path]] = {"base": []}
    for i, kind in enumerate(FAMILIES):
        if kind in ("base", "mixture"):
            continue
        save_adapter(support, kind, root / kind, seed=i)
        dirs[kind] = [root / kind]
    dirs["mixture"] = []
    for j in range(len(MIX_WEIGHTS)):
        save_adapter(support, "mixture_part", root / f"mix{j}", seed=100 + j)
        dirs["mixture"].append(root / f"mix{j}")
    return dirs


class FamilyEngine:
    """One engine serving one family; times every `engine.step` (wrapped on the instance:
    the engine loop calls self.step()) and keeps those whose plan was decode only."""

    def __init__(self, args, family: str, dirs: list[Path]):
        from loraplex.server.engine.config import EngineConfig
        from loraplex.server.engine.engine import Engine

        self.family = family
        self.engine = e = Engine.from_config(EngineConfig(model_dir=args.model, device=args.device, max_rank=args.max_rank,
                                                          max_batch_tokens=args.batch_tokens, max_running=max(64, args.requests),
                                                          kv_cache_tokens=args.kv_tokens, cpu_threads=args.threads))  # fmt: skip
        self.ids = [d.name for d in dirs]
        for d in dirs:
            e.adapters.add(d.name, d)
        self.decode_s: list[float] = []
        self.recording = False
        schedule, step, box = e.scheduler.schedule, e.step, [None]

        def recorded_schedule():
            box[0] = schedule()
            return box[0]

        def timed_step():
            t0 = time.perf_counter()
            step()
            dt = time.perf_counter() - t0
            plan, box[0] = box[0], None
            if self.recording and plan and all(item.num_tokens == 1 for item in plan):
                self.decode_s.append(dt)

        e.scheduler.schedule, e.step = recorded_schedule, timed_step
        e.start()
        e.warmup()

    def request(self, prompt: list[int], new_tokens: int):
        from loraplex.server.engine.request import GenerationRequest, SamplingParams

        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        if self.family == "mixture":
            return GenerationRequest(prompt, params, adapters=tuple(zip(self.ids, MIX_WEIGHTS)))
        return GenerationRequest(prompt, params, adapter_id=self.ids[0] if self.ids else None)

    def run(self, prompts: list[list[int]], new_tokens: int) -> dict:
        """All prompts submitted at once; tokens/s and the median decode step of the batch."""
        self.decode_s.clear()
        self.recording = True
        t0 = time.perf_counter()
        handles = [self.engine.submit(self.request(p, new_tokens)) for p in prompts]
        results = [h.result(timeout=3600) for h in handles]
        wall = time.perf_counter() - t0
        self.recording = False
        errors = {r.error for r in results if r.error}
        if errors:
            raise RuntimeError(f"{self.family}: {errors}")
        tokens = sum(r.generated_tokens for r in results)
        return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "steps_ms": [1e3 * s for s in self.decode_s]}

    def served_ranks(self) -> dict[str, list[int]]:
        """Module name -> rank per layer, as served (the mixture's: the weights staged for it)."""
        a = self.engine.adapters
        if self.family != "mixture":
            return a.get(self.ids[0]).ranks if self.ids else {}
        staged = a.host.get(a.mixture_key(tuple(zip(self.ids, MIX_WEIGHTS))))
        return staged.weights.ranks if staged is not None else {}

    def close(self) -> None:
        self.engine.shutdown(1)


def rank_summary(ranks: dict[str, list[int]]) -> str:
    """'16' when every module serves at one rank, else 'min-max'."""
    all_ranks = sorted({r for rs in ranks.values() for r in rs})
    if not all_ranks:
        return "0"
    return str(all_ranks[0]) if len(all_ranks) == 1 else f"{all_ranks[0]}-{all_ranks[-1]}"


def write_bars(path: Path, title: str, rows: list[dict]) -> Path | None:
    """Two horizontal bar panels (× LoRA tokens/s, decode step ms), one bar per family."""
    fig = common.new_figure(9, 0.9 + 0.32 * len(rows))
    if fig is None:
        return None
    left, right = fig.subplots(1, 2, sharey=True)
    labels = [f"{r['family']} (r {r['served_rank']})" for r in rows]
    ys = range(len(rows))
    left.barh(ys, [r["vs_lora"] for r in rows])
    left.axvline(1, color="gray", linestyle="--", linewidth=1)
    left.set_xlabel("tokens/s × LoRA r=16")
    right.barh(ys, [r["step_ms"] for r in rows], color="tab:orange")
    right.set_xlabel("median decode step (ms)")
    left.set_yticks(list(ys), labels, fontsize="small")
    left.invert_yaxis()
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize="medium")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=TINY, help="HF model directory (default: the bundled tiny model)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--requests", type=int, default=32, help="requests per batch, all for one family's adapter")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--rounds", type=int, default=10, help="timed batches per family (round-robin); medians reported")
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of " + ",".join(FAMILIES))
    p.add_argument("--max-rank", type=int, default=32, help="engine max_rank (the same for every family)")
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--kv-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1, help="engine cpu_threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="result path (default bench/results/families-<time>.json)")
    args = p.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        p.error(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    if "lora" not in families:
        families.insert(0, "lora")  # the reference every row is relative to
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device")

    rng = random.Random(args.seed)
    prompts = [[1] + [rng.randrange(3, 250) for _ in range(args.prompt_len - 1)] for _ in range(args.requests)]
    timings: dict[str, float] = {}
    engines: dict[str, FamilyEngine] = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        dirs = make_adapters(Path(tmp))
        timings["adapters_s"] = time.perf_counter() - t
        t = time.perf_counter()
        try:
            for f in families:
                engines[f] = FamilyEngine(args, f, dirs[f])
                engines[f].run(prompts[:2], 4)  # warm-up: the adapter (or mixture) loaded into a slot
            timings["engines_s"] = time.perf_counter() - t
            t = time.perf_counter()
            runs: dict[str, list[dict]] = {f: [] for f in families}
            for _ in range(args.rounds):
                for f in families:
                    runs[f].append(engines[f].run(prompts, args.new_tokens))
            timings["timed_s"] = time.perf_counter() - t
            ranks = {f: engines[f].served_ranks() for f in families}
        finally:
            for e in engines.values():
                e.close()

    rows = []
    for f in families:
        rs = runs[f]
        tok_s = [r["tok_s"] for r in rs]
        q1, _, q3 = statistics.quantiles(tok_s, n=4) if len(tok_s) > 1 else (tok_s[0],) * 3
        rows.append({"family": f, "served_rank": rank_summary(ranks[f]), "ranks": ranks[f],
                     "tok_s": statistics.median(tok_s), "iqr_pct": 100 * (q3 - q1) / statistics.median(tok_s),
                     "step_ms": statistics.median(ms for r in rs for ms in r["steps_ms"]),  # every decode step of every round
                     "decode_steps": sum(len(r["steps_ms"]) for r in rs), "wall_s": statistics.median(r["wall_s"] for r in rs),
                     "tokens": rs[0]["tokens"], "tok_s_rounds": tok_s})  # fmt: skip
    lora = next(r for r in rows if r["family"] == "lora")
    for r in rows:
        r["vs_lora"] = r["tok_s"] / lora["tok_s"]
        r["step_vs_lora"] = r["step_ms"] / lora["step_ms"]
    threads = f", cpu_threads={args.threads}" if args.device == "cpu" else ""
    print(f"{args.requests} requests × {args.new_tokens} greedy new tokens per family, one engine each, {args.device}{threads}, "
          f"median of {args.rounds} rounds (IQR: of tok/s over rounds)")  # fmt: skip
    common.print_table(rows, [("family", "family", "s"), ("served_rank", "served rank", "s"), ("tok_s", "tok/s", ".0f"), ("iqr_pct", "IQR %", ".0f"),
                              ("step_ms", "decode step ms", ".2f"), ("vs_lora", "tok/s × LoRA", ".2f"),
                              ("step_vs_lora", "step × LoRA", ".2f")])  # fmt: skip
    print(f"adapters {timings['adapters_s']:.1f} s, engines {timings['engines_s']:.1f} s, timed {timings['timed_s']:.1f} s",
          file=sys.stderr)
    payload = {"env": common.environment(torch.device(args.device)), "args": {k: str(v) for k, v in vars(args).items()},
               "timings": timings, "rows": rows}  # fmt: skip
    path = common.write_json(args.json, "families", payload)
    png = write_bars(path.with_suffix(".png"), f"adapter families at served rank 16 ({args.device}, {args.requests} × "
                     f"{args.new_tokens} tokens)", rows)  # fmt: skip
    print(f"wrote {path}" + (f" and {png.name}" if png else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
