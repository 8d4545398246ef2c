"""The cost of writing one adapter into a device slot (`AdapterPages.apply`): wall time on
the calling thread and the aten ops it issues (each one a launch on CUDA), for LoRA and
DoRA adapters of rank 16 on all seven projections, at the bundled model's shapes and at
Llama-3-8B's with 8 and 32 layers.

    python bench/adapter_writes.py                     # CPU
    python bench/adapter_writes.py --device cuda       # the write is issued, then synced

The layers are AdapterLinears over a stand-in base (the write never touches the base),
in the order a LlamaModel gives them, so the pools, slots and views are the server's.
A write's time on the calling thread ("issue") is what a load costs the thread that
issues it: on the CPU the copies themselves, on CUDA the launches (the copies run on the
stream); "done" is until the device has finished it (a synchronize), and GB/s is the
staged bytes over that.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

try:
    from bench import common, engine_e2e, step_ops  # python -m bench.adapter_writes
except ImportError:
    import common  # python bench/adapter_writes.py
    import engine_e2e
    import step_ops

from loraplex.adapters.form import AdapterWeights, ModuleDelta
from loraplex.server.engine.adapter_pages import AdapterPages
from loraplex.server.model.adapter_linear import AdapterLinear

GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
TINY = engine_e2e.Shape(layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=256)
SHAPES = {"tiny": TINY, "llama3-8b-8layer": engine_e2e.LLAMA3_8B_8L,
          "llama3-8b": dataclasses.replace(engine_e2e.LLAMA3_8B_8L, layers=32)}  # fmt: skip


class StandInBase(nn.Module):
    """What AdapterLinear reads of its base at construction: the slices' widths."""

    def __init__(self, widths):
        super().__init__()
        self.widths = list(widths)


class Layers:
    """The adapter layers of a model of `shape`, as AdapterPages sees a LlamaModel."""

    def __init__(self, shape: engine_e2e.Shape, dtype: torch.dtype, device: torch.device):
        self.device = device
        dims = shape.module_shapes()
        self.groups = [
            (layer, AdapterLinear(names, StandInBase([dims[n][1] for n in names]), [None] * len(names), dims[names[0]][0], dtype, device))
            for layer in range(shape.layers) for names in GROUPS
        ]  # fmt: skip

    def adapter_groups(self):
        yield from self.groups


def random_adapter(shape: engine_e2e.Shape, rank: int, dora: bool, gen: torch.Generator) -> AdapterWeights:
    modules = {}
    for layer in range(shape.layers):
        for name, (fan_in, fan_out) in shape.module_shapes().items():
            g = torch.rand(fan_out, generator=gen) + 0.5 if dora else None
            modules[(layer, name)] = ModuleDelta(torch.randn(rank, fan_in, generator=gen), torch.randn(fan_out, rank, generator=gen), 2.0, g)
    return AdapterWeights("dora" if dora else "lora", modules)


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not step_ops._is_view(func)
        return func(*args, **(kwargs or {}))


def measure(shape_name: str, kind: str, args, device: torch.device) -> dict:
    shape = SHAPES[shape_name]
    dtype = getattr(torch, args.dtype)
    pages = AdapterPages(Layers(shape, dtype, device), args.slots, args.max_rank)
    gen = torch.Generator().manual_seed(0)
    staged = pages.stage(random_adapter(shape, args.rank, kind == "dora", gen))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def write(slot: int) -> tuple[float, float]:
        """(seconds to issue the write on this thread, seconds until it is done on the device)."""
        pages.release(slot)
        plan = pages.assign(slot, staged)
        t0 = time.perf_counter()
        pages.apply(plan)
        issued = time.perf_counter() - t0
        sync()
        return issued, time.perf_counter() - t0

    for i in range(2):
        write(i % args.slots)  # warm-up
    timed = [write(i % args.slots) for i in range(args.iters)]
    times, done = [t for t, _ in timed], [d for _, d in timed]
    counter = OpCounter()
    with counter:
        write(0)
    return {"shape": shape_name, "layers": shape.layers, "kind": kind, "rank": args.rank,
            "staged_mb": staged.nbytes / 2**20, "ops": counter.ops,
            "issue_ms_p50": 1e3 * statistics.median(times), "issue_ms_max": 1e3 * max(times),
            "done_ms_p50": 1e3 * statistics.median(done), "gbs": staged.nbytes / statistics.median(done) / 1e9}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="bfloat16", help="the adapter tensors' dtype (default bfloat16)")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--slots", type=int, default=4, help="device slots (default 4)")
    p.add_argument("--max-rank", type=int, default=64, help="the pool's max rank (default 64)")
    p.add_argument("--iters", type=int, default=10, help="timed writes per case (default 10)")
    p.add_argument("--json", default=None, help="where to write the JSON (default bench/results/)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("adapter_writes: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    torch.set_grad_enabled(False)
    rows = [measure(s, k, args, device) for s in args.shapes for k in ("lora", "dora")]
    print(f"one adapter write (AdapterPages.apply), rank {args.rank}, all 7 projections, {args.dtype} on {device}")
    common.print_table(rows, [("shape", "shape", "s"), ("layers", "layers", "d"), ("kind", "kind", "s"),
                              ("staged_mb", "staged MiB", ".2f"), ("ops", "aten ops", "d"),
                              ("issue_ms_p50", "issue ms p50", ".2f"), ("issue_ms_max", "issue ms max", ".2f"),
                              ("done_ms_p50", "done ms p50", ".2f"), ("gbs", "staged GB/s", ".1f")])  # fmt: skip
    path = common.write_json(args.json, "adapter_writes", {"args": vars(args), "env": common.environment(device), "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
