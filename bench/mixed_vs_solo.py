"""Mixed batch = solo, under stress: N greedy streams over adapters of every kind (LoRA,
rsLoRA, DoRA, VeRA, AdaLoRA, made by PEFT on the bundled tiny model) and base rows, run
once alone and once in waves of mixed batches; counts the streams whose tokens differ and,
for each, says whether it is rounding on near-tied logits or a bug.

    python bench/mixed_vs_solo.py                       # 2,000 streams, CPU, ~3 min
    python bench/mixed_vs_solo.py --streams 200 --device cuda

Solo: each distinct (adapter, prompt) runs alone, one request in the engine at a time, for
the largest max_new_tokens any job asks of it (greedy tokens do not depend on where the
stream stops, so shorter jobs compare against its prefix). Mixed: the jobs in waves of
1–64 streams, part of each wave joining while the rest decode, the next wave starting
before the last has drained; prefill chunks (--batch-tokens) share steps with decodes.

The engine's logits of every step are recorded (its runner's `run` is wrapped on the
instance; no engine code changes), so each difference reports the top-2 margin at its
first differing token in the solo run, in the mixed batch, and from `score_sequence` (one
sequence, scored after shutdown), with the batch of that step. Verdict: solo margin under
1e-4 of the row's largest |logit| -> "near-tie rounding", else "bug: investigate". Drift:
the largest |mixed - solo| logit over all positions whose inputs were identical, the
rounding noise the verdict is measured against. Times are reported, never asserted.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

try:
    from bench import common  # python -m bench.mixed_vs_solo
except ImportError:
    import common  # python bench/mixed_vs_solo.py

import loraplex

TINY = Path(loraplex.__file__).parent / "assets" / "tiny-llama"
SUPPORT = Path(__file__).resolve().parent.parent / "tests" / "support" / "peft_adapters.py"
NEAR_TIE = 1e-4  # relative top-2 margin below which a flip is rounding
WORDS = ("the", "a", "cat", "dog", "bird", "small", "blue", "red", "old", "new", "boat", "house", "garden", "river",
         "team", "builds", "paints", "watches", "sings", "runs", "over", "under", "every", "night", "morning", "our",
         "teacher", "green", "light", "stone", "quiet", "song", "field", "window", "city", "winter")  # fmt: skip


def peft_adapters_module():
    """tests/support/peft_adapters.py, loaded by path (no sys.path edit)."""
    spec = importlib.util.spec_from_file_location("peft_adapters", SUPPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_adapters(out: Path, per_kind: int) -> dict[str, str]:
    """Saves per_kind PEFT adapters of each kind under `out`; returns name -> kind."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per adapter otherwise
    support = peft_adapters_module()
    names = {}
    for k, kind in enumerate(support.KINDS):
        for i in range(per_kind):
            name = f"{kind}{i}"
            support.save_peft_adapter(kind, out / name, seed=100 * k + i)
            names[name] = kind
    return names


def make_jobs(rng: random.Random, n: int, adapters: list[str], num_prompts: int, min_new: int, max_new: int) -> list[tuple]:
    """n jobs (adapter or None, prompt text, max_new_tokens) over a pool of num_prompts prompts."""
    prompts = [" ".join(rng.choices(WORDS, k=rng.randint(1, 9))) for _ in range(num_prompts)]
    choices = adapters + [None]
    return [(rng.choice(choices), rng.choice(prompts), rng.randint(min_new, max_new)) for _ in range(n)]


class Recorder:
    """Wraps `engine.runner.run`: keeps each step's batch and every logits row, keyed by the
    request handle and the index of the generated token it produced."""

    def __init__(self, engine):
        self._run = engine.runner.run
        engine.runner.run = self
        self.steps: list[tuple] = []  # (sequences, tokens fed, prefill chunks, slots of the rows)
        self.rows: dict[str, dict[int, tuple[torch.Tensor, int]]] = {}  # request id -> index -> (logits [vocab], step)
        self.slot_of: dict[str, int] = {}  # request id -> slot

    def __call__(self, plan, **kw):
        logits = self._run(plan, **kw)
        step = len(self.steps)
        self.steps.append((len(plan), sum(i.num_tokens for i in plan), sum(i.num_tokens > 1 for i in plan),
                           tuple(i.seq.slot for i in plan)))  # fmt: skip
        wanting = [i.seq for i in plan if i.wants_logits]  # before the engine advances num_computed
        cpu = logits.detach().float().cpu()
        for row, seq in enumerate(wanting):
            self.rows.setdefault(seq.seq_id, {})[seq.num_tokens - seq.num_prompt] = (cpu[row].clone(), step)
            self.slot_of[seq.seq_id] = seq.slot
        return logits

    def produced(self, handle) -> int:
        return len(self.rows.get(handle.request.request_id, ()))


def progress(phase: str, done: int, total: int, t0: float, last: list[float]) -> None:
    now = time.perf_counter()
    if now - last[0] >= 10 or done == total:
        last[0] = now
        print(f"[{phase}] {done}/{total} streams, {now - t0:.0f} s", file=sys.stderr, flush=True)


def run_solo(engine, rec: Recorder, jobs: list[tuple]) -> dict:
    """(adapter, prompt) -> (tokens, handle) of its longest job, run alone."""
    from loraplex.server.engine.request import GenerationRequest, SamplingParams

    longest: dict[tuple, int] = {}
    for a, p, n in jobs:
        longest[(a, p)] = max(longest.get((a, p), 0), n)
    out, t0, last = {}, time.perf_counter(), [time.perf_counter()]
    for i, ((a, p), n) in enumerate(longest.items()):
        h = engine.submit(GenerationRequest(engine.tokenizer.encode(p), SamplingParams(max_new_tokens=n, ignore_eos=True), adapter_id=a))
        out[(a, p)] = (list(h.result(timeout=600).token_ids), h)
        progress("solo", i + 1, len(longest), t0, last)
    return out


def run_mixed(engine, rec: Recorder, jobs: list[tuple], rng: random.Random) -> list:
    """Submits the jobs in overlapping waves of 1–64; returns their handles in job order."""
    from loraplex.server.engine.request import GenerationRequest, SamplingParams

    handles, i, t0, last = [], 0, time.perf_counter(), [time.perf_counter()]

    def submit(job):
        a, p, n = job
        handles.append(engine.submit(GenerationRequest(engine.tokenizer.encode(p), SamplingParams(max_new_tokens=n, ignore_eos=True), adapter_id=a)))

    def wait(cond, timeout=600.0):
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise TimeoutError("the engine stopped making progress")
            time.sleep(0.002)

    while i < len(jobs):
        size = min(rng.choice((1, 2, 3, 5, 8, 13, 21, 32, 48, 64)), len(jobs) - i)
        wave = jobs[i : i + size]
        i += size
        first = max(1, size // 2) if size > 1 and rng.random() < 0.7 else size
        for job in wave[:first]:
            submit(job)
        if first < size:  # the rest joins once the first of the wave has decoded a few tokens
            lead, k = handles[-first], rng.randint(1, 6)
            wait(lambda lead=lead, k=k: lead.finished is not None or rec.produced(lead) >= k)
            for job in wave[first:]:
                submit(job)
        # the next wave starts while up to half of this one still runs
        mine, keep = handles[-size:], rng.randint(0, size // 2)
        wait(lambda mine=mine, keep=keep: sum(h.finished is None for h in mine) <= keep)
        progress("mixed", sum(h.finished is not None for h in handles), len(jobs), t0, last)
    for h in handles:
        h.result(timeout=600)
    progress("mixed", len(jobs), len(jobs), t0, [0.0])
    return handles


def top2(row: torch.Tensor) -> tuple[float, int, float, int]:
    v, ix = row.topk(2)
    return float(v[0]), int(ix[0]), float(v[1]), int(ix[1])


def analyse(engine, rec: Recorder, jobs, solo, handles, kinds: dict[str, str]) -> tuple[list[dict], dict]:
    """Differences (one dict each) and the drift between mixed and solo logits."""
    from loraplex.server.model.llama import score_sequence

    rid = lambda h: h.request.request_id
    slot_kind = {rec.slot_of[rid(h)]: (kinds[a] if a else "base") for (a, _), (_, h) in solo.items() if rid(h) in rec.slot_of}
    # per compared position: rel (max|Δlogit| / max|logit|, max|Δlogit|, kind, index, mixed step); ties: solo top-2 margin / max|logit|
    diffs, rel, ties = [], [], []
    for (a, p, n), h in zip(jobs, handles):
        ref_tokens, ref_handle = solo[(a, p)]
        ref, got = ref_tokens[:n], list(h.finished.token_ids)
        first = next((k for k, (x, y) in enumerate(zip(ref, got)) if x != y), None)
        if first is None and len(ref) != len(got):
            first = min(len(ref), len(got))
        s_rows, m_rows = rec.rows[rid(ref_handle)], rec.rows[rid(h)]
        upto = n if first is None else first + 1  # positions whose inputs are identical
        for k in range(upto):
            d = float((m_rows[k][0] - s_rows[k][0]).abs().max())
            rel.append((d / float(s_rows[k][0].abs().max()), d, kinds[a] if a else "base", k, m_rows[k][1]))
            v = s_rows[k][0].topk(2).values
            ties.append(float(v[0] - v[1]) / float(s_rows[k][0].abs().max()))
        if first is None:
            continue
        s, (m, step) = s_rows[first][0], m_rows[first]
        scale = float(s.abs().max())
        s1, _, s2, _ = top2(s)
        m1, m_argmax, m2, _ = top2(m)
        sa, mb = ref[first] if first < len(ref) else -1, got[first] if first < len(got) else -1
        seqs, tokens, prefills, slots = rec.steps[step]
        diffs.append(dict(
            adapter=a or "base", kind=kinds[a] if a else "base", prompt=p, max_new_tokens=n, first_diff=first,
            solo_token=sa, mixed_token=mb, mixed_is_argmax=mb == m_argmax, logit_scale=scale,
            solo_margin=s1 - s2, mixed_margin=m1 - m2, solo_rel_margin=(s1 - s2) / scale,
            solo_gap=float(s[sa] - s[mb]), mixed_gap=float(m[mb] - m[sa]),  # each run's preference between the two tokens
            max_abs_logit_diff=float((m - s).abs().max()),
            step=step, batch_seqs=seqs, batch_tokens=tokens, batch_prefills=prefills,
            batch_kinds=dict(Counter(slot_kind.get(x, f"slot{x}") for x in slots)),
            prompt_ids=engine.tokenizer.encode(p), prefix=ref[:first],
        ))  # fmt: skip
    # score_sequence on the idle engine's model: one sequence, prefill-shaped, an independent third run
    for d in diffs:
        slot = -1
        if d["adapter"] != "base":
            key = engine.adapters.key_of(d["adapter"])
            slot = engine.adapters.device.slot_of(key)
            if slot is None:  # evicted: write it back by hand into slot 0
                slot = 0
                engine.adapters.pages.write(slot, engine.adapters.pages.stage(engine.adapters.convert(engine.adapters.get(d["adapter"]).path)))
        ids = d.pop("prompt_ids") + d.pop("prefix")
        row = score_sequence(engine.model, ids, slot=slot, ops=engine.runner.ops)[-1].float().cpu()
        v1, ix, v2, _ = top2(row)
        d.update(score_margin=v1 - v2, score_token=ix)
        d["verdict"] = "near-tie rounding" if d["solo_rel_margin"] < NEAR_TIE else "bug: investigate"
    rel.sort()
    worst = rel[-1] if rel else (0.0, 0.0, None, None, None)
    seqs, tokens, prefills, _ = rec.steps[worst[4]] if rel else (None,) * 4
    drift = dict(positions_compared=len(rel), max_abs_logit_diff=max((r[1] for r in rel), default=0.0),
                 max_rel_logit_diff=worst[0], median_rel=rel[len(rel) // 2][0] if rel else 0.0,
                 p99_rel=rel[int(0.99 * (len(rel) - 1))][0] if rel else 0.0, exact_fraction=sum(r[1] == 0 for r in rel) / max(1, len(rel)),
                 worst=dict(kind=worst[2], index=worst[3], batch_seqs=seqs, batch_tokens=tokens, batch_prefills=prefills),
                 min_solo_rel_margin=min(ties, default=None), solo_margins_below_near_tie=sum(t < NEAR_TIE for t in ties),
                 max_rel_by_kind={k: max(r[0] for r in rel if r[2] == k) for k in sorted({r[2] for r in rel})})  # fmt: skip
    return diffs, drift


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--per-kind", type=int, default=2, help="adapters of each kind")
    p.add_argument("--prompts", type=int, default=200, help="distinct prompts in the pool")
    p.add_argument("--min-new", type=int, default=8)
    p.add_argument("--max-new", type=int, default=32)
    p.add_argument("--batch-tokens", type=int, default=256, help="engine max tokens per step (prefill chunks share steps with decodes)")
    p.add_argument("--threads", type=int, default=1, help="engine cpu_threads")
    p.add_argument("--json", type=Path, default=None, help="result path (default bench/results/mixed_vs_solo-<time>.json)")
    args = p.parse_args(argv)

    from loraplex.server.engine.config import EngineConfig
    from loraplex.server.engine.engine import Engine

    rng = random.Random(args.seed)
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        kinds = make_adapters(Path(tmp), args.per_kind)
        timings["adapters_s"] = time.perf_counter() - t
        jobs = make_jobs(rng, args.streams, sorted(kinds), args.prompts, args.min_new, args.max_new)
        engine = Engine.from_config(EngineConfig(model_dir=TINY, adapter_root=Path(tmp), device=args.device,
                                                 adapter_slots=max(16, len(kinds)), max_rank=32, max_batch_tokens=args.batch_tokens,
                                                 max_running=64, kv_cache_tokens=16384, cpu_threads=args.threads))  # fmt: skip
        rec = Recorder(engine)
        engine.start()
        engine.warmup()
        t = time.perf_counter()
        solo = run_solo(engine, rec, jobs)
        timings["solo_s"], solo_steps = time.perf_counter() - t, len(rec.steps)
        t = time.perf_counter()
        handles = run_mixed(engine, rec, jobs, rng)
        timings["mixed_s"] = time.perf_counter() - t
        engine.shutdown(5)
        mixed_steps = rec.steps[solo_steps:]
        t = time.perf_counter()
        diffs, drift = analyse(engine, rec, jobs, solo, handles, kinds)
        timings["analyse_s"] = time.perf_counter() - t

    by_kind: dict[str, dict] = {}
    for a, _, n in jobs:
        r = by_kind.setdefault(kinds[a] if a else "base", dict(kind=kinds[a] if a else "base", streams=0, tokens=0, differing=0))
        r["streams"] += 1
        r["tokens"] += n
    for d in diffs:
        by_kind[d["kind"]]["differing"] += 1
    rows = sorted(by_kind.values(), key=lambda r: r["kind"])
    for r in rows:
        ms = [d["solo_margin"] for d in diffs if d["kind"] == r["kind"]]
        r["min_margin"], r["max_margin"] = (min(ms), max(ms)) if ms else (None, None)
    rows.append(dict(kind="all", streams=len(jobs), tokens=sum(r["tokens"] for r in rows), differing=len(diffs),
                     min_margin=min((d["solo_margin"] for d in diffs), default=None),
                     max_margin=max((d["solo_margin"] for d in diffs), default=None)))  # fmt: skip
    sizes = [s[0] for s in mixed_steps]
    mixed_info = dict(steps=len(mixed_steps), mean_batch=sum(sizes) / max(1, len(sizes)), max_batch=max(sizes, default=0),
                      steps_with_prefill=sum(s[2] > 0 for s in mixed_steps),
                      batch_size_hist={str(k): v for k, v in sorted(Counter(sizes).items())})  # fmt: skip

    print(f"{len(jobs)} greedy streams ({len(solo)} distinct solo runs) over {len(kinds)} adapters + base, "
          f"{args.min_new}-{args.max_new} new tokens, {args.device}, {args.threads} thread(s); "
          f"mixed: {mixed_info['steps']} steps, mean batch {mixed_info['mean_batch']:.1f}, max {mixed_info['max_batch']}")  # fmt: skip
    common.print_table(rows, [("kind", "kind", "s"), ("streams", "streams", "d"), ("tokens", "tokens", "d"),
                              ("differing", "differing", "d"), ("min_margin", "min top-2 margin", ".3g"),
                              ("max_margin", "max top-2 margin", ".3g")])  # fmt: skip
    print(f"drift where inputs were identical: max |mixed - solo| logit {drift['max_abs_logit_diff']:.3g} "
          f"({drift['max_rel_logit_diff']:.3g} of the row's max |logit|; median {drift['median_rel']:.2g}, p99 {drift['p99_rel']:.2g}, "
          f"{100 * drift['exact_fraction']:.0f}% bit-equal) over {drift['positions_compared']} positions")
    print(f"near ties in the solo runs: {drift['solo_margins_below_near_tie']} positions with top-2 margin under {NEAR_TIE:g} "
          f"of max|logit| (smallest {drift['min_solo_rel_margin']:.2g})")
    print("max relative drift by kind: " + ", ".join(f"{k} {v:.2g}" for k, v in drift["max_rel_by_kind"].items()))
    if diffs:
        print()
        common.print_table(diffs, [("adapter", "adapter", "s"), ("first_diff", "first diff", "d"), ("batch_seqs", "batch", "d"),
                                   ("solo_margin", "solo margin", ".3g"), ("mixed_margin", "mixed margin", ".3g"),
                                   ("score_margin", "score margin", ".3g"), ("solo_rel_margin", "rel", ".2g"),
                                   ("max_abs_logit_diff", "max |Δlogit|", ".3g"), ("verdict", "verdict", "s")])  # fmt: skip
    print("time: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    payload = {"env": common.environment(torch.device(args.device)), "args": {k: str(v) for k, v in vars(args).items()},
               "rows": rows, "differences": diffs, "drift": drift, "mixed": mixed_info, "timings_s": timings}  # fmt: skip
    path = common.write_json(args.json, "mixed_vs_solo", payload)
    print(f"wrote {path}", file=sys.stderr)
    if diffs:
        ranked = sorted(diffs, key=lambda d: d["solo_rel_margin"])
        log10 = lambda x: math.log10(max(x, 1e-12))
        series = {"solo": [(i, log10(d["solo_rel_margin"])) for i, d in enumerate(ranked)],
                  "mixed": [(i, log10(d["mixed_margin"] / d["logit_scale"])) for i, d in enumerate(ranked)],
                  f"near-tie bound {NEAR_TIE:g}": [(0, log10(NEAR_TIE)), (max(1, len(ranked) - 1), log10(NEAR_TIE))]}
        png = common.write_png(path.with_suffix(".png"), "top-2 logit margin at each first differing token (sorted)",
                               [("log10 margin / max|logit|", series)], xlabel="difference")  # fmt: skip
        if png:
            print(f"wrote {png}", file=sys.stderr)


if __name__ == "__main__":
    main()
