"""Counts the device work of one pure decode step of the real engine: batch 32 over 8
rank-16 LoRA adapters (PEFT directories with random weights) on the bundled tiny model,
Triton adapter kernels (under TRITON_INTERPRET=1 without a GPU), driven through
`Engine.step()` on the calling thread. After a warm-up round and the prefill of all 32
requests, exactly one `engine.step()` is recorded with a TorchDispatchMode (aten ops)
and a wrapper around Triton's `run` (kernel launches).

Counting rule (per op as the dispatch mode sees it, one decode step):
  view        an aten op whose schema returns an alias of an input that it does not
              write (`Tensor(a)`, e.g. view, t, transpose, expand, slice, select, split,
              unsqueeze, squeeze, permute, detach, alias, as_strided) and whose outputs
              do share an input's storage, plus `_unsafe_view`, `lift_fresh`,
              `_reshape_alias` and the in-place metadata ops (detach_, squeeze_,
              unsqueeze_, transpose_, t_, as_strided_): not a launch. Ops that may
              alias but copied this time (`to`, `reshape`, `contiguous`, `chunk` reach
              the mode whole under inference_mode) are launches.
  allocation  empty.memory_format, empty_strided, empty_like, empty_permuted, new_empty,
              new_empty_strided, resize_, set_: not a launch (zeros, full, fill_,
              zero_, arange, … write memory and are launches).
  launch      every other aten op, custom ops included (bitsandbytes::gemm_4bit counts
              one; its CUDA implementation may run a dequantize and a matmul instead),
              every Triton kernel launch (aten ops inside a Triton launch — the
              interpreter's copies — are not recorded), and every `torch.tensor(data,
              device=…)` of host data ("upload": one host→device copy on CUDA).
  host sync   `_local_scalar_dense` (item, int, bool of a tensor), `tolist`, `nonzero`,
              `masked_select`, `unique*`, `repeat_interleave` with tensor repeats and no
              output_size, an index by a bool mask, and a copy from a device tensor to
              the host — on a device tensor only. Tensors built from host data without
              `device=` (and what is computed from them alone) are host tensors: the ops
              on them are neither launches nor syncs (on CPU every tensor lives on the
              host, so this tracking is what tells the two apart).
  bytes       output bytes of launches that are neither in place nor `out=` (fresh
              tensors the step writes), Triton launches excluded.
  KV copy     a data-moving launch (index, gather, repeat_interleave, cat, clone, copies…)
              that reads the KV cache, or such a copy of it, and is not the cache's own
              in-place write: its output bytes are a per-step copy of the cache.

Ops are attributed to where they run: the runner's input building, "embed+rope" (the
model's forward before layer 0), the decoder layers (the decode attention layout that
layer 0 builds once per step is its own region), "norm+lm_head", and "sampling" (after
the forward returns). Targets for the step rewrite: <= 20 launches per layer, <= 1 host
sync per step, no KV copy. Exit 0 whatever the numbers (a measurement); `--check` exits
1 when a target is missed.

    TRITON_INTERPRET=1 python bench/step_ops.py [--dtype bfloat16] [--check]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402
from torch.utils.weak import WeakIdKeyDictionary  # noqa: E402

try:
    from bench import common  # python -m bench.step_ops
    from bench.engine_e2e import write_lora_dirs
except ImportError:
    import common  # python bench/step_ops.py
    from engine_e2e import write_lora_dirs

import loraplex  # noqa: E402

TINY = Path(loraplex.__file__).parent / "assets" / "tiny-llama"
TARGET_LAUNCHES_PER_LAYER = 20
TARGET_SYNCS = 1
TARGET_KV_COPY_BYTES = 0

EXTRA_VIEWS = {"_unsafe_view", "lift_fresh", "_reshape_alias",  # and in-place ops that change metadata only:
               "detach_", "squeeze_", "unsqueeze_", "transpose_", "t_", "as_strided_", "swapdims_", "swapaxes_"}  # fmt: skip
ALLOCATIONS = {"empty", "empty_strided", "empty_like", "empty_permuted", "new_empty", "new_empty_strided", "resize_", "set_"}
MOVES = {"index", "index_select", "gather", "repeat_interleave", "clone", "contiguous", "_to_copy", "to", "cat", "stack",
         "reshape", "_unsafe_view", "repeat", "expand_copy", "take", "masked_select"}  # fmt: skip
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
            "unique_consecutive", "nonzero_static"}  # fmt: skip


def _name(func) -> str:
    return func._schema.name.split("::")[-1] if func._schema.name.startswith("aten::") else func._schema.name


def _is_view(func) -> bool:
    name = _name(func)
    if name in EXTRA_VIEWS:
        return True
    rets = func._schema.returns
    return bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write for r in rets)


def _aliases(outs, ins) -> bool:
    """Does every output share storage with an input? (`to`, `reshape`, `contiguous`,
    `chunk` declare an alias but copy when they must: then they are launches.)"""
    storages = {t.untyped_storage().data_ptr() for t in ins}
    return all(t.numel() == 0 or t.untyped_storage().data_ptr() in storages for t in outs)


def _mutates(func) -> bool:
    return any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)


class StepRecorder(TorchDispatchMode):
    """Records aten ops by region (Probes adds the Triton launches, uploads and tolist syncs)."""

    def __init__(self, kv_storages: set[int], host: WeakIdKeyDictionary):
        super().__init__()
        self.kv_storages = kv_storages
        self.host = host  # tensors that live on the host (built from host data without device=)
        self.region = "runner"
        self.paused = 0
        self.launches: Counter = Counter()  # (region, op) -> count
        self.syncs: list[tuple[str, str]] = []  # (region, op)
        self.bytes = Counter()  # region -> bytes written by fresh outputs
        self.kv_copy = Counter()  # op -> bytes
        self.kv_derived = WeakIdKeyDictionary()  # copies of the cache made this step
        self.views = Counter()
        self.allocs = Counter()
        self.host_ops = Counter()

    def launch(self, region: str, name: str) -> None:
        self.launches[(region, name)] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused:
            return out
        name = _name(func)
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        view = _is_view(func) and (name in EXTRA_VIEWS or _aliases(outs, ins))
        upload = name in ("_to_copy", "copy_") and str(kwargs.get("device", "cpu")) != "cpu"
        if ins and all(t in self.host for t in ins) and not upload:  # host work, not the device's
            for t in outs:
                self.host[t] = True
            if not (view or name in ALLOCATIONS or name == "_local_scalar_dense"):
                self.host_ops[name] += 1
            return out
        if view:
            self.views[name] += 1
            if any(self._from_kv(t) for t in ins):
                for t in outs:
                    self.kv_derived[t] = True
            return out
        if name in ALLOCATIONS:
            self.allocs[name] += 1
            return out
        self.launch(self.region, name)
        if self._syncs(name, func, args, kwargs):
            self.syncs.append((self.region, name))
        if not _mutates(func):
            self.bytes[self.region] += sum(t.nbytes for t in outs)
            if name in MOVES and any(self._from_kv(t) for t in ins):
                self.kv_copy[name] += sum(t.nbytes for t in outs)
                for t in outs:
                    self.kv_derived[t] = True
        return out

    def _from_kv(self, t: torch.Tensor) -> bool:
        return t in self.kv_derived or t.untyped_storage().data_ptr() in self.kv_storages

    def _syncs(self, name, func, args, kwargs) -> bool:
        if name in SYNC_OPS:
            return True
        if name == "repeat_interleave" and isinstance(args[1] if len(args) > 1 else None, torch.Tensor):
            return kwargs.get("output_size") is None
        if name in ("index", "index_put_", "index_put") and len(args) > 1:
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
        if name in ("_to_copy", "copy_") and kwargs.get("device") in ("cpu", torch.device("cpu")):
            return True
        return False


class Probes:
    """Region tags (module hooks) and Triton/`torch.tensor`/`tolist` wrappers, for one step."""

    def __init__(self, engine, rec: StepRecorder):
        self.engine, self.rec = engine, rec
        self._undo = []

    def __enter__(self):
        rec, model = self.rec, self.engine.model
        layers = list(model.layers)

        def tag(region):
            return lambda *a, **k: setattr(rec, "region", region)

        hooks = [model.register_forward_pre_hook(tag("embed+rope")), model.register_forward_hook(tag("sampling"))]
        for i, layer in enumerate(layers):
            hooks.append(layer.register_forward_pre_hook(tag(f"layer{i}")))
        hooks.append(layers[-1].register_forward_hook(tag("norm+lm_head")))
        self._undo += [h.remove for h in hooks]

        from loraplex.server.model import attention

        layout = getattr(attention, "DecodeLayout", None)  # the torch path's per-step layout, if it still exists
        if layout is not None:
            build = layout.build.__func__

            def traced_build(cls, *a, **k):
                prev, rec.region = rec.region, "decode layout"
                try:
                    return build(cls, *a, **k)
                finally:
                    rec.region = prev

            layout.build = classmethod(traced_build)
            self._undo.append(lambda: setattr(layout, "build", classmethod(build)))

        from triton.runtime import jit

        targets = [jit.JITFunction]
        if os.environ.get("TRITON_INTERPRET") == "1":
            from triton.runtime.interpreter import InterpretedFunction

            targets.append(InterpretedFunction)
        for cls in targets:
            self._wrap_run(cls)

        real_tensor, real_tolist = torch.tensor, torch.Tensor.tolist

        def tensor(data, *a, **k):
            t = real_tensor(data, *a, **k)
            if k.get("device") is None:
                rec.host[t] = True
            elif not rec.paused:
                rec.launch(rec.region, "upload:torch.tensor")
            return t

        def tolist(t):
            if not rec.paused and t not in rec.host:
                rec.launch(rec.region, "tolist (device->host copy)")
                rec.syncs.append((rec.region, "tolist"))
            return real_tolist(t)

        own_tolist = "tolist" in torch.Tensor.__dict__
        torch.tensor, torch.Tensor.tolist = tensor, tolist

        def undo():
            torch.tensor = real_tensor
            if own_tolist:
                torch.Tensor.tolist = real_tolist
            else:
                del torch.Tensor.tolist

        self._undo.append(undo)
        return self

    def _wrap_run(self, cls) -> None:
        rec, real = self.rec, cls.run

        def run(fn, *a, **k):
            outer = rec.paused == 0
            if outer and not k.get("warmup"):
                rec.launch(rec.region, f"triton:{getattr(fn, '__name__', type(fn).__name__)}")
            rec.paused += 1
            try:
                return real(fn, *a, **k)
            finally:
                rec.paused -= 1

        cls.run = run
        self._undo.append(lambda: setattr(cls, "run", real))

    def __exit__(self, *exc):
        for undo in reversed(self._undo):
            undo()


def build_engine(args, adapter_root: Path):
    from loraplex.server.engine.config import EngineConfig
    from loraplex.server.engine.engine import Engine

    cfg = EngineConfig(model_dir=TINY, adapter_root=adapter_root, device=args.device, dtype=args.dtype,
                       lora_backend="triton", kernel_backend=args.kernels, adapter_slots=args.adapters, max_rank=args.rank,
                       max_batch_tokens=2048, max_running=max(64, args.batch), kv_cache_tokens=8192,
                       overlap_steps=args.overlap_steps)  # fmt: skip
    return Engine.from_config(cfg)


def run_until(engine, done, max_steps: int = 2000) -> None:
    for _ in range(max_steps):
        if done():
            return
        common.pump_submitted(engine)
        engine.step()
    raise RuntimeError("the engine did not reach the wanted state")


def measure(args) -> dict:
    from loraplex.server.engine.request import GenerationRequest, SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        names = write_lora_dirs(TINY, Path(tmp), args.adapters, args.rank)
        engine = build_engine(args, Path(tmp))
        try:
            g = torch.Generator().manual_seed(0)

            def prompt(n):
                return [1] + torch.randint(3, 250, (n - 1,), generator=g).tolist()

            # warm-up: every adapter into its slot, every path once (prefill, decode, Triton)
            warm = [engine.submit(GenerationRequest(prompt(12), SamplingParams(max_new_tokens=3, ignore_eos=True), adapter_id=a))
                    for a in names]  # fmt: skip
            run_until(engine, lambda: all(h.finished for h in warm))
            params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
            for i in range(args.batch):
                engine.submit(GenerationRequest(prompt(args.prompt_len), params, adapter_id=names[i % len(names)]))
            sched = engine.scheduler

            def all_decoding():
                run = sched.running
                return not sched.waiting and not engine._incoming and len(run) == args.batch and all(s.pending == 1 for s in run)

            run_until(engine, all_decoding)
            common.pump_submitted(engine)  # two more decode steps first: caches, allocator, mapping buffers settled
            engine.step()
            engine.step()
            cache = engine.runner.cache
            kv = {t.untyped_storage().data_ptr() for t in cache.k + cache.v}
            rec = StepRecorder(kv, WeakIdKeyDictionary())
            steps_before = engine.steps
            with Probes(engine, rec), rec:
                engine.step()
            assert engine.steps == steps_before + 1 and all(s.pending == 1 for s in sched.running), "not one decode step"
            context = [s.num_computed for s in sched.running]
        finally:
            engine.shutdown(0)
    return summarize(args, engine, rec, context)


def summarize(args, engine, rec: StepRecorder, context: list[int]) -> dict:
    layers = engine.model.config.num_layers
    by_region = Counter()
    for (region, _), n in rec.launches.items():
        by_region[region] += n
    layer_counts = [by_region[f"layer{i}"] for i in range(layers)]
    in_layers = sum(layer_counts)
    outside = {r: n for r, n in by_region.items() if not r.startswith("layer")}
    total = sum(by_region.values())
    ops = Counter()
    layer_ops = Counter()
    for (region, name), n in rec.launches.items():
        ops[name] += n
        if region.startswith("layer"):
            layer_ops[name] += n
    region_ops: dict[str, dict[str, int]] = {}
    for (region, name), n in sorted(rec.launches.items(), key=lambda kv: -kv[1]):
        region_ops.setdefault(region, {})[name] = n
    kv_bytes = sum(rec.kv_copy.values())
    per_layer = in_layers / layers
    return dict(
        bench="step_ops", device=str(engine.model.device), dtype=str(engine.model.dtype),
        triton_interpret=os.environ.get("TRITON_INTERPRET") == "1", batch=args.batch, adapters=args.adapters,
        rank=args.rank, num_layers=layers, context_lens=context,
        launches_total=total, launches_in_layers=in_layers, launches_per_layer=per_layer, layer_launches=layer_counts,
        launches_outside_layers=outside, host_syncs=len(rec.syncs), host_sync_ops=[f"{r}: {n}" for r, n in rec.syncs],
        bytes_written=sum(rec.bytes.values()), bytes_by_region=dict(rec.bytes), kv_copy_bytes=kv_bytes,
        kv_copy_ops=dict(rec.kv_copy), region_ops=region_ops, op_counts=dict(ops.most_common()), layer_op_counts=dict(layer_ops.most_common()),
        views=dict(rec.views.most_common()), allocations=dict(rec.allocs), host_ops=dict(rec.host_ops.most_common()),
        targets=dict(launches_per_layer=TARGET_LAUNCHES_PER_LAYER, host_syncs=TARGET_SYNCS, kv_copy_bytes=TARGET_KV_COPY_BYTES),
        met=dict(launches_per_layer=per_layer <= TARGET_LAUNCHES_PER_LAYER, host_syncs=len(rec.syncs) <= TARGET_SYNCS,
                 kv_copy_bytes=kv_bytes <= TARGET_KV_COPY_BYTES),
    )  # fmt: skip


def report(r: dict, top: int) -> None:
    print(f"one decode step: batch {r['batch']} over {r['adapters']} rank-{r['rank']} LoRA adapters, tiny model "
          f"({r['num_layers']} layers), {r['device']} {r['dtype']}, Triton adapter kernels"
          f"{' (interpreter)' if r['triton_interpret'] else ''}, context {min(r['context_lens'])}-{max(r['context_lens'])}")
    layer_bytes = sum(v for k, v in r["bytes_by_region"].items() if k.startswith("layer"))
    rows = [{"what": "launches per layer", "value": f"{r['launches_per_layer']:.1f}", "target": f"<= {TARGET_LAUNCHES_PER_LAYER}",
             "status": "ok" if r["met"]["launches_per_layer"] else "MISS"},
            {"what": "host syncs per step", "value": str(r["host_syncs"]), "target": f"<= {TARGET_SYNCS}",
             "status": "ok" if r["met"]["host_syncs"] else "MISS"},
            {"what": "KV-cache copy bytes per step", "value": f"{r['kv_copy_bytes']:,}", "target": "0",
             "status": "ok" if r["met"]["kv_copy_bytes"] else "MISS"},
            {"what": "launches per step (all)", "value": str(r["launches_total"])},
            {"what": "bytes written per step (fresh outputs)", "value": f"{r['bytes_written']:,}"},
            {"what": "bytes written per layer", "value": f"{layer_bytes / r['num_layers']:,.0f}"}]  # fmt: skip
    common.print_table(rows, [("what", "measure", "s"), ("value", "value", "s"), ("target", "target", "s"), ("status", "status", "s")])
    print(f"\nlaunches per layer: {r['layer_launches']}; outside the layers:")
    common.print_table([{"region": k, "launches": v, "bytes": r["bytes_by_region"].get(k, 0)} for k, v in r["launches_outside_layers"].items()],
                       [("region", "region", "s"), ("launches", "launches", "d"), ("bytes", "bytes written", ",d")])
    print("\nhost syncs: " + ("; ".join(r["host_sync_ops"]) or "none"))
    if r["kv_copy_ops"]:
        print("KV-cache copies: " + "; ".join(f"{k} {v:,} B" for k, v in r["kv_copy_ops"].items()))
    print(f"\ntop ops in the layers (all {r['num_layers']} layers; ÷ {r['num_layers']} = per layer):")
    rows = [{"op": k, "n": v, "per_layer": v / r["num_layers"]} for k, v in list(r["layer_op_counts"].items())[:top]]
    common.print_table(rows, [("op", "op", "s"), ("n", "count", "d"), ("per_layer", "per layer", ".2f")])
    outside = Counter(r["op_counts"])
    outside.subtract(r["layer_op_counts"])
    rows = [{"op": k, "n": v} for k, v in outside.most_common(top) if v > 0]
    print("\ntop ops outside the layers:")
    common.print_table(rows, [("op", "op", "s"), ("n", "count", "d")])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--dtype", default="bfloat16",
                   help="bfloat16 (default: the server's dtype on CUDA, so its casts are counted), float32 (the CPU default), auto")
    p.add_argument("--kernels", default="triton", choices=("torch", "triton"),
                   help="attention, RoPE + KV write, RMSNorm, SiLU·up: triton = the CUDA configuration (interpreter on CPU)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--overlap-steps", default="on", choices=("auto", "on", "off"),
                   help="on (CUDA's default): the recorded step also feeds its decode tokens from the previous step's ids "
                        "on the device and reads that step's ids; off: sync steps")
    p.add_argument("--top", type=int, default=15, help="rows of the op tables")
    p.add_argument("--json", type=Path, default=common.RESULTS_DIR / "step_ops.json")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the tiny model gains nothing from more; keeps a shared CPU free
    r = measure(args)
    report(r, args.top)
    path = common.write_json(args.json, "step_ops", {"env": common.environment(torch.device(r["device"])), **r})
    print(f"wrote {path}", file=sys.stderr)
    return 1 if args.check and not all(r["met"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
