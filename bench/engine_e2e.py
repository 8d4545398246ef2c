"""End-to-end serving speed on Llama-3-8B's shapes: 8 decoder layers (hidden 4096,
intermediate 14336, 32 heads, 8 KV heads, head_dim 128, vocabulary 32,000, RoPE theta
500000) with random weights, written once as a Hugging Face Llama directory and loaded
in NF4 by each side; batch 32, prompts of 128 token ids, 64 new tokens (greedy,
ignore_eos), 32 distinct rank-16 LoRA adapters on all seven projections (random,
non-zero, PEFT directories under the engine's adapter root).

Rows, in one run: loraplex (EngineConfig's defaults on CUDA but for 32 adapter slots, a
device pool and host cache sized to hold them, and the NF4 backend: `--nf4-backend`,
default auto, our fused Triton dequant-matmul, since bitsandbytes dequantizes the whole
weight for every batched matmul and so reads ~9x the NF4 bytes a decode step must; if
that engine fails to build or warm up, the run says so and falls back to bitsandbytes)
with 32 distinct adapters (and, last, the same on bitsandbytes' NF4 for comparison), the same
eager (no CUDA graphs), the same with sync steps (each step's tokens read before the
next step is launched: what overlapped steps buy), one for all, and none; Hugging Face transformers NF4 (BitsAndBytesConfig, double quantization) + PEFT's
mixed-adapter batch (`generate(..., adapter_names=[...])`, the 32 adapters loaded with
`load_adapter`). Columns: tok/s over the whole run (prefill included), the median decode
step (loraplex: gaps between a request's token events once every request decodes; PEFT:
gaps between logits-processor calls), the bytes a decode step must read (NF4 layers at
4.127 bits per weight, the bf16 lm_head, the factors of the adapters the batch uses, the
KV cache at the mean decode context) over the measured device copy bandwidth — the
memory limit — and the step's fraction of it. Baseline (issue): PEFT 72.8 tok/s on an
H100; target: loraplex at >= 50% of the memory limit (~34,000 tok/s on an H200).

    python bench/engine_e2e.py            # the GPU run (~3 min, model creation included)
    python bench/engine_e2e.py --smoke    # tiny shapes on the CPU, every path, and a
                                          # check that loraplex's greedy tokens equal PEFT's

The tokenizer is the bundled tiny model's (requests are token ids; it only decodes).
Speed is reported, never asserted; only --smoke's token check sets the exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

try:
    from bench import common  # python -m bench.engine_e2e
except ImportError:
    import common  # python bench/engine_e2e.py

import loraplex

TINY = Path(loraplex.__file__).parent / "assets" / "tiny-llama"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NF4_BITS = 4.127  # 4-bit codes + fp8 absmax per 64 + fp32 absmax per 256 blocks (double quantization)


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rope_theta: float = 500000.0

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each target module."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip


LLAMA3_8B_8L = Shape(layers=8, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=32000)
SMOKE = Shape(layers=2, hidden=256, intermediate=512, heads=4, kv_heads=2, head_dim=64, vocab=512)


def hf_config(s: Shape) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s.hidden,
            "intermediate_size": s.intermediate, "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
            "num_key_value_heads": s.kv_heads, "head_dim": s.head_dim, "vocab_size": s.vocab, "hidden_act": "silu",
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": s.rope_theta, "rope_type": "default"},
            "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 0, "dtype": "bfloat16", "use_cache": True}  # fmt: skip


def write_model_dir(out: Path, s: Shape, device: str, seed: int = 0) -> Path:
    """A HF Llama directory of random bf16 weights (drawn on `device`), with the tiny model's tokenizer."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(s), indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY / name, out / name)
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, std):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * std).to(torch.bfloat16).cpu()

    def ones():
        return torch.ones(s.hidden, dtype=torch.bfloat16)

    tensors = {"model.embed_tokens.weight": rand(s.vocab, s.hidden, std=1.0), "model.norm.weight": ones(),
               "lm_head.weight": rand(s.vocab, s.hidden, std=s.hidden**-0.5)}  # fmt: skip
    for i in range(s.layers):
        p = f"model.layers.{i}"
        tensors[f"{p}.input_layernorm.weight"] = ones()
        tensors[f"{p}.post_attention_layernorm.weight"] = ones()
        for name, (fan_in, fan_out) in s.module_shapes().items():
            sub = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            tensors[f"{p}.{sub}.{name}.weight"] = rand(fan_out, fan_in, std=fan_in**-0.5)
    partial = out / "model.safetensors.partial"  # renamed when whole: a run killed mid-write leaves no model to reuse
    save_file(tensors, str(partial), metadata={"format": "pt"})
    os.replace(partial, out / "model.safetensors")
    return out


def write_lora_dirs(model_dir: Path, out: Path, k: int, rank: int, seed: int = 0, dtype=torch.float32, device: str = "cpu") -> list[str]:
    """k PEFT LoRA directories (a0 … a{k-1}) on all seven projections of the model in
    `model_dir`, random and non-zero: A ~ N(0, 1/in), B ~ N(0, 1/r) (alpha = 2r)."""
    from safetensors.torch import save_file

    c = json.loads((model_dir / "config.json").read_text())
    shape = Shape(c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                  c["num_key_value_heads"], c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"], c["vocab_size"])  # fmt: skip
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
              "bias": "none", "lora_dropout": 0.0, "base_model_name_or_path": str(model_dir)}  # fmt: skip
    g = torch.Generator(device=device).manual_seed(seed)
    names = []
    for a in range(k):
        tensors = {}
        for i in range(shape.layers):
            for name, (fan_in, fan_out) in shape.module_shapes().items():
                sub = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
                p = f"base_model.model.model.layers.{i}.{sub}.{name}"
                tensors[f"{p}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=g, device=device) * fan_in**-0.5).to(dtype).cpu()
                tensors[f"{p}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=g, device=device) * rank**-0.5).to(dtype).cpu()
        d = out / f"a{a}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "adapter_config.json").write_text(json.dumps(config))
        save_file(tensors, str(d / "adapter_model.safetensors"))
        names.append(d.name)
    return names


def step_bytes(s: Shape, batch: int, context: float, adapters: int, rank: int) -> dict:
    """Bytes one decode step must read: NF4 layers, bf16 lm_head, adapter factors, KV."""
    mods = s.module_shapes().values()
    base = s.layers * sum(i * o for i, o in mods) * NF4_BITS / 8
    lm_head = s.vocab * s.hidden * 2
    factors = adapters * s.layers * rank * sum(i + o for i, o in mods) * 2
    kv = batch * context * s.layers * 2 * s.kv_heads * s.head_dim * 2
    return {"nf4_layers": base, "lm_head": lm_head, "adapters": factors, "kv": kv, "total": base + lm_head + factors + kv}


# -- loraplex ------------------------------------------------------------------------------
def make_engine(args, model_dir: Path, adapter_root: Path, shape: Shape, jobs, nf4_backend: str | None = None):
    """A started engine, warmed up and with `jobs`' kernels compiled by a short run of them;
    shut down again if any of that fails."""
    from loraplex.server.engine.config import EngineConfig
    from loraplex.server.engine.engine import Engine

    # the adapter pool must hold all of the batch's adapters: rank pages of 16 rows of A
    # and Bᵀ per module, plus per-slot vectors of `out` (DoRA's g, VeRA's λ_b), with room to spare
    size = 2 if args.device == "cuda" else 4
    mods = shape.module_shapes().values()
    page = shape.layers * sum(16 * (i + o) for i, o in mods) * size
    slot = shape.layers * sum(2 * o for _, o in mods) * size
    pool = int(1.25 * args.adapters * (page * -(-args.rank // 16) + slot)) + (16 << 20)
    cfg = EngineConfig(model_dir=model_dir, adapter_root=adapter_root, device=args.device, adapter_slots=args.adapters,
                       max_rank=args.rank, adapter_pool_bytes=pool, host_cache_bytes=max(1 << 30, 4 * pool), nf4_backend=nf4_backend or args.nf4_backend,
                       max_running=max(64, args.batch), kv_cache_tokens=max(16384, args.batch * (args.prompt_len + args.new_tokens)))  # fmt: skip
    engine = Engine.from_config(cfg)
    try:
        engine.start()
        engine.warmup()
        run_engine(engine, jobs, min(4, args.new_tokens))  # compiles the batch's kernels
    except BaseException:
        engine.shutdown(1)  # its thread, validator and device memory must not outlive a failed start
        raise
    return engine


@contextlib.contextmanager
def eager_steps(engine):
    """Decode steps without the CUDA graphs and with the layers bound as `--cuda-graphs off`
    binds them (adapter vectors only where resident adapters have them); the engine must
    be idle. Private attributes: fine in a bench."""
    runner = engine.runner
    graphs, runner.graphs = runner.graphs, None
    engine.model.bind(runner.step, runner.ops, engine.max_context, static_adapters=False)
    try:
        yield
    finally:
        engine.model.bind(runner.step, runner.ops, engine.max_context, static_adapters=graphs is not None)
        runner.graphs = graphs


@contextlib.contextmanager
def sync_steps(engine):
    """Steps as `--overlap-steps off` runs them; the engine must be idle."""
    overlap, engine.overlap = engine.overlap, False
    try:
        yield
    finally:
        engine.overlap = overlap


def run_bnb_row(args, model_dir: Path, adapter_root: Path, shape: Shape, mixed, label: str, k: int) -> dict:
    """The mixed batch on an engine whose NF4 matmuls are bitsandbytes' (the engine's default)."""
    engine = make_engine(args, model_dir, adapter_root, shape, mixed, nf4_backend="bnb")
    try:
        return {"system": "loraplex, bnb NF4", "adapters": label, "k": k, **run_engine(engine, mixed, args.new_tokens)}
    finally:
        engine.shutdown(1)
        if args.device == "cuda":
            torch.cuda.empty_cache()


def run_engine(engine, jobs: list[tuple[list[int], str | None]], new_tokens: int) -> dict:
    from loraplex.server.engine.request import GenerationRequest, SamplingParams, TokenEvent

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    t0 = time.monotonic()
    handles = [engine.submit(GenerationRequest(list(ids), params, adapter_id=a)) for ids, a in jobs]
    times = []  # per request, the time of each token event
    for h in handles:
        times.append([ev.time for ev in h.events(timeout=600) if isinstance(ev, TokenEvent) and ev.token_ids])
    end = max(h.finished.time for h in handles)
    for h in handles:
        if h.finished.error:
            raise RuntimeError(f"loraplex request failed: {h.finished.error}")
    steady = max(t[0] for t in times)  # every request decodes from here on
    gaps = [b - a for t in times for a, b in zip(t, t[1:]) if a >= steady]
    tokens = sum(h.finished.generated_tokens for h in handles)
    return {"wall_s": end - t0, "tokens": tokens, "tok_s": tokens / (end - t0), "step_ms": 1e3 * statistics.median(gaps) if gaps else None,
            "outputs": [list(h.finished.token_ids) for h in handles]}  # fmt: skip


# -- Hugging Face + PEFT -------------------------------------------------------------------
def load_peft(args, model_dir: Path, adapter_root: Path, names: list[str]):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if args.device == "cuda":
        from transformers import BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=q, dtype=torch.bfloat16, device_map="cuda")
    else:  # the CPU: the same NF4 values through our quantizer (bitsandbytes' exact dequantize-then-matmul path)
        from loraplex.server.model.quantize import quantize_hf_decoder_

        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        quantize_hf_decoder_(base, torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_root / names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapter_root / name), adapter_name=name)
    return model.eval()


def run_peft(model, jobs, new_tokens: int, device: str) -> dict:
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    clock = Clock()
    ids = torch.tensor([p for p, _ in jobs], device=device)  # prompts of one length: no padding
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    # ignore_eos as loraplex does: an EOS id no token has (min_new_tokens would instead forbid the model's
    # EOS and change greedy tokens; eos_token_id=None falls back to the model's)
    vocab = model.get_base_model().config.vocab_size
    gen_config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=vocab, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=[a for _, a in jobs],
                             generation_config=gen_config, logits_processor=LogitsProcessorList([clock]))  # fmt: skip
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    gen = out[:, ids.shape[1] :]
    gaps = [b - a for a, b in zip(clock.times[1:], clock.times[2:])]  # decode steps (the first call follows the prefill)
    return {"wall_s": wall, "tokens": gen.numel(), "tok_s": gen.numel() / wall, "step_ms": 1e3 * statistics.median(gaps) if gaps else None,
            "outputs": gen.tolist()}  # fmt: skip


# -- the run -------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU; checks loraplex's greedy tokens against PEFT's")
    p.add_argument("--batch", type=int, default=None, help="requests (default 32; smoke 8)")
    p.add_argument("--adapters", type=int, default=None, help="distinct adapters (default 32; smoke 4)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128; smoke 16)")
    p.add_argument("--new-tokens", type=int, default=None, help="generated tokens per request (default 64; smoke 8)")
    p.add_argument("--model-dir", type=Path, default=None, help="reuse (or create here) the model directory")
    p.add_argument("--skip-peft", action="store_true", help="loraplex rows only")
    p.add_argument("--nf4-backend", choices=("bnb", "auto", "triton"), default="auto",
                   help="loraplex's NF4 base matmul (EngineConfig.nf4_backend; the engine's own default is bnb)")
    p.add_argument("--json", type=Path, default=None, help="result path (default bench/results/engine_e2e-<time>.json)")
    p.add_argument("--png", type=Path, default=None, help="bar chart path (default: beside the JSON)")
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("engine_e2e: no CUDA device. The benchmark needs a GPU; --smoke runs tiny shapes on the CPU.", file=sys.stderr)
        return 2
    args.device = "cpu" if args.smoke else "cuda"
    shape = SMOKE if args.smoke else LLAMA3_8B_8L
    args.batch = args.batch or (8 if args.smoke else 32)
    args.adapters = args.adapters or (4 if args.smoke else 32)
    args.prompt_len = args.prompt_len or (16 if args.smoke else 128)
    args.new_tokens = args.new_tokens or (8 if args.smoke else 64)
    if args.smoke:
        torch.set_num_threads(1)
    t_start = time.monotonic()

    def log(msg):
        print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = args.model_dir or tmp / "model"
        if not (model_dir / "model.safetensors").exists():
            write_model_dir(model_dir, shape, args.device)
        log(f"model directory ready ({model_dir})")
        adapter_root = tmp / "adapters"
        names = write_lora_dirs(model_dir, adapter_root, args.adapters, args.rank,
                                dtype=torch.bfloat16 if args.device == "cuda" else torch.float32, device=args.device)  # fmt: skip
        log(f"{len(names)} adapters written")
        g = torch.Generator().manual_seed(1)
        prompts = [[1] + torch.randint(3, shape.vocab, (args.prompt_len - 1,), generator=g).tolist() for _ in range(args.batch)]
        mixed = [(ids, names[i % len(names)]) for i, ids in enumerate(prompts)]
        mixed_label = f"{len(names)} distinct"
        workloads = [("loraplex", mixed_label, mixed, len(names)),
                     ("loraplex", "1 for all", [(ids, names[0]) for ids in prompts], 1),
                     ("loraplex", "none", [(ids, None) for ids in prompts], 0)]  # fmt: skip
        rows = []
        args.nf4_fallback = None
        try:
            engine = make_engine(args, model_dir, adapter_root, shape, mixed)
        except Exception as e:  # noqa: BLE001 - the fused kernel failing must not lose the run: said, then bitsandbytes
            if args.nf4_backend == "bnb":
                raise
            args.nf4_fallback = f"nf4_backend={args.nf4_backend} failed ({type(e).__name__}: {e}); rows use bnb"
            log(args.nf4_fallback)
            args.nf4_backend = "bnb"
            engine = make_engine(args, model_dir, adapter_root, shape, mixed)
        log(f"engine loaded and warmed up (nf4_backend {args.nf4_backend})")
        try:
            for system, adapters, jobs, k in workloads:
                rows.append({"system": system, "adapters": adapters, "k": k, **run_engine(engine, jobs, args.new_tokens)})
                log(f"{system} / {adapters}: {rows[-1]['tok_s']:.1f} tok/s, decode step {rows[-1]['step_ms']} ms")
            with eager_steps(engine):  # the mixed batch again, eager: what the graphs buy (on the CPU both are eager)
                rows.insert(1, {"system": "loraplex eager", "adapters": mixed_label, "k": len(names), **run_engine(engine, mixed, args.new_tokens)})
            log(f"loraplex eager / {mixed_label}: {rows[1]['tok_s']:.1f} tok/s, decode step {rows[1]['step_ms']} ms")
            with sync_steps(engine):  # and with sync steps: what overlapping the host's work buys (on the CPU all are sync)
                rows.insert(2, {"system": "loraplex sync steps", "adapters": mixed_label, "k": len(names), **run_engine(engine, mixed, args.new_tokens)})
            log(f"loraplex sync steps / {mixed_label}: {rows[2]['tok_s']:.1f} tok/s, decode step {rows[2]['step_ms']} ms")
        finally:
            engine.shutdown(1)
            del engine
        if args.device == "cuda":
            torch.cuda.empty_cache()
        device = torch.device(args.device)
        bandwidth = common.copy_bandwidth_gbs(device) * 1e9  # bytes/s (read + write)
        json_path = args.json
        if not args.skip_peft:  # loraplex's figures first: a baseline that overruns the step's budget loses only itself
            json_path = report(args, shape, rows, bandwidth, None, "the HF NF4 + PEFT baseline has not run yet", json_path)
        peft_error = None
        if not args.skip_peft:
            try:  # the baseline's failure must not lose loraplex's rows
                model = load_peft(args, model_dir, adapter_root, names)
                log("PEFT model loaded")
                run_peft(model, mixed[: min(4, len(mixed))], 2, args.device)  # warm-up
                rows.append({"system": "HF NF4 + PEFT", "adapters": f"{len(names)} distinct", "k": len(names),
                             **run_peft(model, mixed, args.new_tokens, args.device)})  # fmt: skip
                log(f"PEFT: {rows[-1]['tok_s']:.1f} tok/s")
                del model
            except Exception as e:  # noqa: BLE001 - reported, and the exit status says so
                peft_error = f"{type(e).__name__}: {e}"
                log(f"the HF NF4 + PEFT baseline failed: {peft_error}")
        if args.nf4_backend != "bnb":  # last, after a report: the mixed batch on bitsandbytes' NF4, for comparison
            json_path = report(args, shape, rows, bandwidth, peft_error, "the mixed batch on bitsandbytes' NF4 has not run yet", json_path)
            try:
                rows.append(run_bnb_row(args, model_dir, adapter_root, shape, mixed, mixed_label, len(names)))
                log(f"{rows[-1]['system']} / {mixed_label}: {rows[-1]['tok_s']:.1f} tok/s, decode step {rows[-1]['step_ms']} ms")
            except Exception as e:  # noqa: BLE001 - a comparison row: said, not fatal
                log(f"the mixed batch on bitsandbytes' NF4 failed: {type(e).__name__}: {e}")
    path = report(args, shape, rows, bandwidth, peft_error, None, json_path)
    plot(rows, 1e3 * args.batch / rows[0]["limit_ms"], args.png or path.with_suffix(".png"))
    log("done")
    if peft_error is not None:
        print(f"FAIL: the PEFT baseline did not run: {peft_error}", file=sys.stderr)
        return 1
    peft = next((r for r in rows if r["system"].startswith("HF")), None)
    same = None if peft is None else sum(a == b for a, b in zip(rows[0]["outputs"], peft["outputs"]))
    if args.smoke and peft is not None and same != len(peft["outputs"]):
        print(f"FAIL: loraplex's greedy tokens differ from PEFT's for {len(peft['outputs']) - same} requests", file=sys.stderr)
        return 1
    return 0


def report(args, shape: Shape, rows: list[dict], bandwidth: float, peft_error: str | None, pending: str | None,
           json_path: Path | None) -> Path:  # fmt: skip
    """Adds the memory-limit figures to `rows`, prints the table and writes the JSON to
    json_path (None: a new file), which it returns; `pending` says what has not run yet
    (the first report, before the baseline). bandwidth: bytes/s."""
    device = torch.device(args.device)
    context = args.prompt_len + (args.new_tokens - 1) / 2  # mean context over the decode steps
    for r in rows:
        r["bytes"] = step_bytes(shape, args.batch, context, r["k"], args.rank)
        r["limit_ms"] = 1e3 * r["bytes"]["total"] / bandwidth
        r["pct_limit"] = 100 * r["limit_ms"] / r["step_ms"] if r["step_ms"] else None
        r["decode_tok_s"] = 1e3 * args.batch / r["step_ms"] if r["step_ms"] else None
        r["gb"] = r["bytes"]["total"] / 1e9
    mixed_limit = rows[0]
    peft = next((r for r in rows if r["system"].startswith("HF")), None)
    same = None
    if peft is not None:
        same = sum(a == b for a, b in zip(rows[0]["outputs"], peft["outputs"]))
        for r in rows:
            r["vs_peft"] = r["tok_s"] / peft["tok_s"]
    print(f"{'smoke: ' if args.smoke else ''}{shape.layers} layers of hidden {shape.hidden} / intermediate {shape.intermediate}, "
          f"vocab {shape.vocab}; batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, rank-{args.rank} "
          f"LoRA on 7 projections; loraplex NF4 backend {args.nf4_backend}; {common.environment(device)['device']}")  # fmt: skip
    if args.nf4_fallback:
        print(f"NOTE: {args.nf4_fallback}")
    print(f"copy bandwidth {bandwidth / 1e9:,.0f} GB/s; bytes per decode step (mixed row): NF4 layers {mixed_limit['bytes']['nf4_layers'] / 1e6:,.1f} MB, "
          f"lm_head {mixed_limit['bytes']['lm_head'] / 1e6:,.1f} MB, adapters {mixed_limit['bytes']['adapters'] / 1e6:,.1f} MB, "
          f"KV {mixed_limit['bytes']['kv'] / 1e6:,.1f} MB (mean context {context:.0f})")  # fmt: skip
    common.print_table(rows, [("system", "system", "s"), ("adapters", "adapters", "s"), ("wall_s", "wall s", ".2f"),
                              ("tokens", "tokens", "d"), ("tok_s", "tok/s", ",.1f"), ("vs_peft", "× PEFT", ".2f"),
                              ("step_ms", "decode step ms", ".3f"), ("decode_tok_s", "decode tok/s", ",.0f"),
                              ("gb", "GB/step", ".3f"), ("limit_ms", "mem-limit ms", ".3f"), ("pct_limit", "% of limit", ".1f")])  # fmt: skip
    limit_tok_s = 1e3 * args.batch / mixed_limit["limit_ms"]
    print(f"memory limit for the mixed batch: {limit_tok_s:,.0f} decode tok/s; target >= 50%: {limit_tok_s / 2:,.0f} tok/s "
          f"({'met' if (mixed_limit['pct_limit'] or 0) >= 50 else 'not met'}). Issue baseline: PEFT 72.8 tok/s on an H100.")  # fmt: skip
    same_eager = sum(a == b for a, b in zip(rows[0]["outputs"], rows[1]["outputs"]))
    same_sync = sum(a == b for a, b in zip(rows[0]["outputs"], rows[2]["outputs"]))
    print(f"greedy tokens: loraplex mixed with CUDA graphs == eager for {same_eager}/{len(rows[0]['outputs'])} requests, "
          f"overlapped == sync steps for {same_sync}")
    if same is not None:
        print(f"greedy tokens: loraplex mixed == PEFT mixed for {same}/{len(peft['outputs'])} requests")
    payload = {"bench": "engine_e2e", "smoke": args.smoke, "env": common.environment(device), "shape": vars(shape),
               "args": {k: str(v) for k, v in vars(args).items()}, "copy_gbs": bandwidth / 1e9, "mean_context": context,
               "memory_limit_tok_s": limit_tok_s, "same_tokens_as_peft": same, "same_tokens_graphs_eager": same_eager,
               "same_tokens_overlapped_sync": same_sync, "peft_error": peft_error, "pending": pending,
               "nf4_backend": args.nf4_backend, "nf4_fallback": args.nf4_fallback,
               "rows": [{k: v for k, v in r.items() if k != "outputs"} for r in rows]}  # fmt: skip
    path = common.write_json(json_path, "engine_e2e-smoke" if args.smoke else "engine_e2e", payload)
    print(f"wrote {path}" + (f" ({pending})" if pending else ""), file=sys.stderr)
    return path


def plot(rows: list[dict], limit_tok_s: float, path: Path) -> None:
    """Bar chart of decode and whole-run tok/s per row, with the memory limit and the target."""
    fig = common.new_figure(7, 3.5)
    if fig is None:
        return
    ax = fig.subplots()
    labels = [f"{r['system']}\n{r['adapters']}" for r in rows]
    ax.bar(labels, [r["decode_tok_s"] or 0 for r in rows], label="decode tok/s (median step)")
    ax.bar(labels, [r["tok_s"] for r in rows], width=0.4, label="tok/s over the run")
    ax.axhline(limit_tok_s, color="k", ls="--", lw=1, label="memory limit (mixed)")
    ax.axhline(limit_tok_s / 2, color="r", ls=":", lw=1, label="target: 50%")
    ax.set_yscale("log")
    ax.set_ylabel("tokens / s")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
