"""The engine thread's own work per decode step, `runner.run` left out (the step's
packing, the step context's fill and the forward): schedule, sampling, and streaming
each token (detokenize, stop strings, events), at batch 32 over 8 rank-16 adapters, as
the outputs grow.

    python bench/step_host.py                 # CPU, the bundled model (~40 s)
    python bench/step_host.py --device cuda

On a GPU a decode step of 8 Llama-3-8B layers reads ~2 GB, about 0.5 ms at the H200's
bandwidth: the host's work must stay well under that, whatever the length of the
outputs, or it, not the GPU, sets the speed. `runner.run` is replaced by a stand-in that
returns fixed logits (a private attribute: fine in a bench), so what is timed is
`engine.step()` minus `runner.run`. With overlapped steps (the CUDA default) this work
runs while the device computes the step before. Prints a table, writes JSON; reports,
never asserts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    from bench import common  # python -m bench.step_host
except ImportError:
    import common  # python bench/step_host.py

import loraplex

TINY = Path(loraplex.__file__).parent / "assets" / "tiny-llama"
SUPPORT = Path(__file__).resolve().parent.parent / "tests" / "support"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 768], help="generated tokens at which steps are timed (the bundled model holds 1,024)")
    p.add_argument("--steps", type=int, default=50, help="timed steps at each length")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, str(SUPPORT))
    from lora_dirs import write_lora

    from loraplex.server.engine.config import EngineConfig
    from loraplex.server.engine.engine import Engine
    from loraplex.server.engine.request import GenerationRequest, SamplingParams

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(args.adapters):
            write_lora(root / f"a{i}", rank=16, seed=i)
        need = args.batch * (max(args.lengths) + args.steps + 16)
        engine = Engine.from_config(EngineConfig(model_dir=TINY, adapter_root=root, device=args.device, adapter_slots=args.adapters,
                                                 max_rank=16, kv_cache_tokens=need, max_running=max(64, args.batch),
                                                 cuda_graphs=False))  # fmt: skip
        engine.adapters.wait_validated(120)
        vocab = engine.model.config.vocab_size
        params = SamplingParams(max_new_tokens=max(args.lengths) + args.steps + 8, ignore_eos=True)
        for i in range(args.batch):
            engine.submit(GenerationRequest([1] + [3 + (7 * i + j) % (vocab - 3) for j in range(8)], params, adapter_id=f"a{i % args.adapters}"))
        common.pump_submitted(engine)
        logits: dict[int, torch.Tensor] = {}
        real_run = engine.runner.run

        def fixed_logits(plan, carry_from=None):
            n = sum(1 for item in plan if item.wants_logits)
            if n not in logits:
                logits[n] = torch.randn(n, vocab, device=engine.model.device)
            return logits[n]

        generated = 0
        for length in sorted(args.lengths):
            engine.runner.run = real_run  # the forward runs while the outputs grow to `length`
            while generated < length:
                engine.step()
                generated += 1
            engine.runner.run = fixed_logits
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - t0)
            generated += args.steps
            rows.append({"generated": length, "batch": args.batch, "host_ms_p50": 1e3 * statistics.median(times),
                         "host_ms_p90": 1e3 * sorted(times)[int(0.9 * (len(times) - 1))]})  # fmt: skip
            print(f"  {length} generated tokens: {rows[-1]['host_ms_p50']:.3f} ms", file=sys.stderr)
        engine.shutdown(1)
    device = torch.device(args.device)
    print(f"engine host work per decode step (forward excluded), batch {args.batch} over {args.adapters} adapters, {args.device}")
    common.print_table(rows, [("generated", "generated tokens", "d"), ("host_ms_p50", "host ms p50", ".3f"), ("host_ms_p90", "host ms p90", ".3f")])
    path = common.write_json(args.json, "step_host", {"bench": "step_host", "env": common.environment(device), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
