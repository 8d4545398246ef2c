"""Mixed-adapter serving: N requests over K adapters (zipf popularity), all submitted at
once, through loraplex's engine and through HF PEFT's mixed-adapter batch
(`generate(..., adapter_names=[...])`, what a user would do without us). Reports wall
time, generated tokens/s and, for loraplex, mean time to first token.

    python bench/engine_mixed.py                      # tiny bundled model, CPU
    python bench/engine_mixed.py --model DIR --device cuda --requests 64 --adapters 16

Greedy decoding, ignore_eos, the same NF4 base on both sides. PEFT runs its batch padded
(left) in one `generate` call; loraplex continuously batches. Speed is reported, never
asserted.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    from bench import common  # python -m bench.engine_mixed
except ImportError:
    import common  # python bench/engine_mixed.py

import loraplex

TINY = Path(loraplex.__file__).parent / "assets" / "tiny-llama"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model_dir: Path, out: Path, k: int, rank: int, device: str) -> list[str]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    names = []
    for i in range(k):
        torch.manual_seed(i)
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        peft = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False))
        name = f"a{i}"
        peft.save_pretrained(str(out / name), safe_serialization=True)
        names.append(name)
    return names


def zipf_choice(rng: random.Random, names: list[str], n: int, s: float = 1.1) -> list[str]:
    weights = [1 / (i + 1) ** s for i in range(len(names))]
    return rng.choices(names, weights=weights, k=n)


def run_loraplex(args, adapters_dir: Path, jobs: list[tuple[list[int], str]]) -> dict:
    from loraplex.server.engine.config import EngineConfig
    from loraplex.server.engine.engine import Engine
    from loraplex.server.engine.request import GenerationRequest, SamplingParams

    engine = Engine.from_config(EngineConfig(model_dir=args.model, adapter_root=adapters_dir, device=args.device,
                                             adapter_slots=max(8, args.adapters), max_rank=args.rank,
                                             max_batch_tokens=args.batch_tokens, kv_cache_tokens=args.kv_tokens,
                                             cpu_threads=args.threads))
    engine.start()
    engine.warmup()
    engine.adapters.wait_validated()  # the root's adapters validated (and staged in the host cache), as PEFT's are loaded
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    handles = [engine.submit(GenerationRequest(ids, params, adapter_id=a)) for ids, a in jobs]
    ttft, tokens = [], 0
    for h in handles:
        first = None
        for ev in h.events(timeout=3600):
            if first is None:
                first = ev.time - h.request.arrival
        ttft.append(first)
        tokens += h.finished.generated_tokens
    wall = time.perf_counter() - t0
    engine.shutdown(1)
    return {"system": "loraplex", "wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "ttft_ms": 1e3 * sum(ttft) / len(ttft)}


def run_peft(args, adapters_dir: Path, names: list[str], jobs: list[tuple[list[int], str]]) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraplex.server.model.quantize import quantize_hf_decoder_

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=dtype).to(args.device)
    quantize_hf_decoder_(base, dtype)
    model = PeftModel.from_pretrained(base, str(adapters_dir / names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters_dir / name), adapter_name=name)
    model.eval()
    width = max(len(ids) for ids, _ in jobs)
    t0 = time.perf_counter()
    tokens = 0
    for start in range(0, len(jobs), args.peft_batch):
        chunk = jobs[start : start + args.peft_batch]
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (p, _) in enumerate(chunk):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(args.device), attention_mask=mask.to(args.device), adapter_names=[a for _, a in chunk],
                                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        tokens += (out.shape[1] - width) * len(chunk)
    wall = time.perf_counter() - t0
    return {"system": "peft mixed batch", "wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "ttft_ms": None}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=TINY, help="HF model directory (default: the bundled tiny model)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--adapters", type=int, default=8, help="distinct LoRA adapters (zipf popularity)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=24, help="prompt tokens (±50%%)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch-tokens", type=int, default=2048, help="loraplex max tokens per step")
    p.add_argument("--kv-tokens", type=int, default=32768)
    p.add_argument("--peft-batch", type=int, default=32, help="PEFT generate() batch size")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for both systems (CPU; default: torch's). On small models one thread is "
                        "fastest: the engine steps in its own thread, where OpenMP's hand-offs cost more than tiny ops gain")
    p.add_argument("--json", type=Path, default=None, help="result path (default bench/results/engine_mixed-<time>.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        adapters_dir = Path(tmp)
        names = make_adapters(args.model, adapters_dir, args.adapters, args.rank, args.device)
        chosen = zipf_choice(rng, names, args.requests)
        jobs = [([1] + [rng.randrange(3, 200) for _ in range(rng.randint(args.prompt_len // 2, args.prompt_len * 3 // 2))], a) for a in chosen]
        rows = [run_loraplex(args, adapters_dir, jobs), run_peft(args, adapters_dir, names, jobs)]
    rows[0]["vs_peft"] = rows[0]["tok_s"] / rows[1]["tok_s"]
    print(f"{args.requests} requests over {args.adapters} rank-{args.rank} LoRA adapters (zipf), {args.new_tokens} new tokens each, "
          f"{args.device}, {torch.get_num_threads()} torch threads")
    common.print_table(rows, [("system", "system", "s"), ("wall_s", "wall s", ".2f"), ("tokens", "tokens", "d"),
                              ("tok_s", "tok/s", ".1f"), ("ttft_ms", "mean TTFT ms", ".1f"), ("vs_peft", "× PEFT", ".2f")])
    path = common.write_json(args.json, "engine_mixed", {"env": common.environment(torch.device(args.device)), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
