"""Cold adapters under load: 32 requests decode steadily on warm (resident) adapters
while requests for 50 cold adapters arrive, first from disk, then from the host cache.

    python bench/cold_adapter.py                      # tiny bundled model, CPU (~35 s)
    python bench/cold_adapter.py --device cuda --model-shape llama3-8b-8layer

The decoders (4 per warm adapter, ignore_eos, --decode-tokens each, first lengths
staggered and refilled as they finish, so their total context and a step's cost stay
steady) run throughout. Phases, one engine (its own thread, `engine.start()`), requests
submitted from this thread:
  quiet  the decoders alone, with warm probes; again at the end (quiet-end), so that
         drift in the machine's load falls on both sides of the comparison;
  disk   one request per cold adapter, every --arrival-ms: registered under the adapter
         root but dropped from the host cache, so the loader thread reads and converts
         its directory (the OS page cache may hold the files: "disk" is the conversion
         path, not a cold read of the drive);
  host   the same cold adapters again, in the same order: the LRU has evicted each one
         from the device by the time it is asked for again, and the host cache holds it.
Warm probes (a resident adapter, same prompt and length as a cold request) are
interleaved in every phase. Each probe's state is read when it is submitted (host cache,
device slot) and it is counted under what it found, not under its phase.

Reported: decode-step time (every `engine.step()` timed, wrapped here; a decode step
feeds one token per row) with and without adapter loads in flight, two ways:
  at start  the brief's test: host loads pending (`AdapterManager._pending`) or device
            writes unreaped (`DeviceAdapters._loading`) when the step starts;
  overlap   a loader conversion (`AdapterManager._reload`) or a device write
            (`DeviceAdapters._write`) ran during the step (both wrapped here to log
            their intervals; on CUDA a write counts twice: the time the engine thread
            issued it, and the copy's interval on the GPU's timeline, from timing
            events on the side stream around it);
and, since a step's cost drifts with its contexts and the machine's load (on a shared
2-core machine the no-load p99 alone is 1.5-2x its p50), paired: each loaded step over
the median of the 20 no-load steps nearest to it in time. Also TTFT (first TokenEvent time − arrival, both time.monotonic()) of warm requests and of
cold ones from disk and from the host cache. These private attributes are fine in a
bench; the engine's code is unchanged. Targets are printed beside the figures; speed is
reported, never asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    from bench import common, engine_e2e  # python -m bench.cold_adapter
except ImportError:
    import common  # python bench/cold_adapter.py
    import engine_e2e

TINY = engine_e2e.TINY
PROBE_PROMPT, PROBE_TOKENS = 8, 4  # cold and warm probes: prompt tokens, new tokens
DECODE_PROMPT = 16
NEIGHBOURS = 20  # no-load steps a loaded step is compared with (Bench.paired)
COLD_ROOM = 8  # device slots beyond the warm adapters: the cold ones cycle through them (LRU)


def pct(xs: list[float], q: float) -> float | None:
    """q-quantile (0..1), linear interpolation; None for no samples."""
    if not xs:
        return None
    s = sorted(xs)
    i = q * (len(s) - 1)
    lo = int(i)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (i - lo)


class Probe:
    def __init__(self, handle, kind: str, state: str, phase: str, t0: float):
        self.handle, self.kind, self.state, self.phase, self.t0 = handle, kind, state, phase, t0

    def ttft_ms(self) -> float | None:
        """Reads the handle's events (once; the request has finished)."""
        from loraplex.server.engine.request import TokenEvent

        if not hasattr(self, "_ttft"):
            self._ttft = None
            for ev in self.handle.events(timeout=120):
                if isinstance(ev, TokenEvent) and ev.token_ids and self._ttft is None:
                    self._ttft = 1e3 * (ev.time - self.handle.request.arrival)
        return self._ttft


class Bench:
    def __init__(self, args, engine, warm: list[str], cold: list[str]):
        from loraplex.server.engine.request import GenerationRequest, SamplingParams

        self.GenerationRequest, self.SamplingParams = GenerationRequest, SamplingParams
        self.args, self.engine, self.warm, self.cold = args, engine, warm, cold
        self.vocab = engine.model.config.vocab_size
        self.rng = random.Random(0)
        self.t_start = time.monotonic()
        self.last_progress = self.t_start
        self.phase = "setup"
        self.phases: dict[str, tuple[float, float]] = {}
        self.steps: list[tuple[float, float, bool, int, bool]] = []  # (t0, t1, loads at start, rows, decode only)
        self.loads: list[tuple[float, float, str, str | None]] = []  # (start, end, "convert" | "write", adapter id of a conversion)
        self.probes: list[Probe] = []
        self.decoders: list = []
        self.stopping = False
        self.gpu_writes: list = []  # (start, end) CUDA timing events of each device write, on the side stream
        self._gpu_ref = None  # (CUDA timing event, its host time): maps the events to time.monotonic()
        if engine.model.device.type == "cuda":
            ref = torch.cuda.Event(enable_timing=True)
            ref.record()
            torch.cuda.synchronize()
            self._gpu_ref = (ref, time.monotonic())
        self._instrument()

    # -- instrumentation (private attributes: a bench may) ---------------------------------------
    def _instrument(self) -> None:
        e, a = self.engine, self.engine.adapters
        plan_box = [None]
        schedule, step, reload, write = e.scheduler.schedule, e.step, a._reload, a.device._write

        def timed_schedule():
            plan_box[0] = schedule()
            return plan_box[0]

        def timed_step():
            at_start = bool(a._pending) or bool(a.device._loading)
            t0 = time.monotonic()
            step()
            t1 = time.monotonic()
            plan, plan_box[0] = plan_box[0], None
            if plan:
                self.steps.append((t0, t1, at_start, len(plan), all(item.num_tokens == 1 for item in plan)))

        def logged(fn, kind):
            def run(*xs):
                t0 = time.monotonic()
                try:
                    return fn(*xs)
                finally:
                    self.loads.append((t0, time.monotonic(), kind, xs[0][0] if kind == "convert" else None))

            return run

        def gpu_timed_write(plan):
            """On CUDA the write is issued here and copied on the side stream afterwards:
            timing events around it on that stream give the copy's interval (`gpu_copies`)."""
            stream = a.device._stream
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            try:
                return write(plan)
            finally:
                end.record(stream)
                self.gpu_writes.append((start, end))

        e.scheduler.schedule, e.step = timed_schedule, timed_step  # the engine loop calls self.step()
        a._reload = logged(reload, "convert")  # executors call self._reload / self._write
        a.device._write = logged(gpu_timed_write if a.device._stream is not None else write, "write")

    # -- driving ---------------------------------------------------------------------------------
    def prompt(self, n: int) -> list[int]:
        return [1] + [self.rng.randrange(3, self.vocab) for _ in range(n - 1)]

    def submit(self, adapter: str, n_prompt: int, n_new: int):
        req = self.GenerationRequest(self.prompt(n_prompt), self.SamplingParams(max_new_tokens=n_new, ignore_eos=True), adapter_id=adapter)
        return self.engine.submit(req)

    def tick(self) -> None:
        """Keeps the decoders at full strength and prints progress every ~10 s."""
        if not self.stopping:
            for i, h in enumerate(self.decoders):
                if h.finished is not None:
                    self.decoders[i] = self.submit(h.request.adapter_id, DECODE_PROMPT, self.args.decode_tokens)
        now = time.monotonic()
        if now - self.last_progress >= 10:
            self.last_progress = now
            s = self.engine.stats()
            print(f"[{now - self.t_start:5.1f}s] phase {self.phase}: {len(self.steps)} steps, {len(self.probes)} probes, "
                  f"{s.adapter_loads} loads, {s.adapter_evictions} evictions, {s.running} running", file=sys.stderr, flush=True)  # fmt: skip

    def sleep_until(self, t: float) -> None:
        while (now := time.monotonic()) < t:
            self.tick()
            time.sleep(min(0.005, t - now))

    def probe(self, adapter: str, kind: str) -> None:
        a = self.engine.adapters
        key = a.key_of(adapter)
        # read from this thread while the engine runs: a dict lookup, good enough to label a probe
        state = "device" if a.device.slot_of(key) is not None else "host" if key in a.host else "disk"
        self.probes.append(Probe(self.submit(adapter, PROBE_PROMPT, PROBE_TOKENS), kind, state, self.phase, time.monotonic()))

    def wait_probes(self) -> None:
        while any(p.handle.finished is None for p in self.probes):
            self.sleep_until(time.monotonic() + 0.01)

    def start_phase(self, name: str) -> float:
        self.phase = name
        t = time.monotonic()
        self.phases[name] = (t, t)
        return t

    def end_phase(self) -> None:
        self.phases[self.phase] = (self.phases[self.phase][0], time.monotonic())

    def quiet(self, name: str, probes: int, interval: float) -> None:
        """The decoders alone, with warm probes 3 arrival gaps apart."""
        t = self.start_phase(name)
        for i in range(probes):
            self.sleep_until(t + (i + 0.5) * interval * 3)
            self.probe(self.warm[i % len(self.warm)], "warm")
        self.sleep_until(t + probes * interval * 3)
        self.wait_probes()
        self.end_phase()

    def run(self) -> None:
        args = self.args
        # staggered first lengths, then refills of --decode-tokens: the decoders' total context
        # (which a CPU step's time follows) stays steady instead of growing through the run
        n, k = args.decode_tokens, args.decode_requests
        self.decoders = [self.submit(self.warm[i % len(self.warm)], DECODE_PROMPT, max(1, round(n * (i + 1) / k))) for i in range(k)]
        first = len(self.steps)
        while len(self.steps) < first + n:  # a full cycle of lengths: the steady state
            self.sleep_until(time.monotonic() + 0.01)
        interval = args.arrival_ms / 1e3
        self.quiet("quiet", args.quiet_probes // 2, interval)
        for phase in ("disk", "host"):
            t = self.start_phase(phase)
            for i, name in enumerate(self.cold):
                self.sleep_until(t + i * interval)
                self.probe(name, "cold")
                if i % 5 == 2:
                    self.sleep_until(t + (i + 0.5) * interval)
                    self.probe(self.warm[i % len(self.warm)], "warm")
            self.wait_probes()
            self.sleep_until(time.monotonic() + 2 * interval)  # the last loads settle
            self.end_phase()
        self.quiet("quiet-end", args.quiet_probes - args.quiet_probes // 2, interval)  # either side: drift (machine load) cancels
        self.stopping = True
        for h in self.decoders:
            h.cancel()
        while not self.engine.idle():
            time.sleep(0.01)

    # -- results ---------------------------------------------------------------------------------
    @staticmethod
    def paired(quiet: list, loaded: list) -> list[float]:
        """Each loaded step's time over the median of the NEIGHBOURS no-load steps nearest to
        it in time: the load's own cost, with the drift of the step's cost (contexts, the
        machine's load) taken out."""
        out = []
        for t0, t1, *_ in loaded:
            near = sorted(quiet, key=lambda q: abs(q[0] - t0))[:NEIGHBOURS]
            if near:
                out.append((t1 - t0) / pct([b - a for a, b, *_ in near], 0.5))
        return out

    def overlaps(self, t0: float, t1: float, kind: str) -> bool:
        return any(s < t1 and e > t0 for s, e, k, _ in self.loads if k == kind)

    def gpu_copies(self) -> list[tuple[float, float, str, None]]:
        """The device writes' intervals on the GPU's timeline ("copy"), in time.monotonic()
        seconds (from the side stream reaching the write, so a wait for the engine stream's
        queued work is included)."""
        if self._gpu_ref is None:
            return []
        torch.cuda.synchronize()
        ref, t_ref = self._gpu_ref
        return [(t_ref + ref.elapsed_time(a) / 1e3, t_ref + ref.elapsed_time(b) / 1e3, "copy", None) for a, b in self.gpu_writes]

    def results(self) -> dict:
        gpu = self.engine.model.device.type == "cuda"
        self.loads += self.gpu_copies()  # a step overlapping a copy on the device overlaps a load
        lo, hi = self.phases["quiet"][0], self.phases["quiet-end"][1]
        # (t0, t1, loads at start, overlaps a conversion, overlaps a device write)
        dec = [(t0, t1, start, self.overlaps(t0, t1, "convert"),
                self.overlaps(t0, t1, "write") or self.overlaps(t0, t1, "copy"))
               for t0, t1, start, _, d in self.steps if d and lo <= t0 <= hi]  # fmt: skip
        ms = lambda sel: [1e3 * (t1 - t0) for t0, t1, *_ in sel]
        quiet = ms([s for s in dec if not any(s[2:])])
        at_start, overlap = ms([s for s in dec if s[2]]), ms([s for s in dec if s[3] or s[4]])
        conv_steps, write_steps = ms([s for s in dec if s[3]]), ms([s for s in dec if s[4] and not s[3]])
        ttft = {}
        for p in self.probes:
            ttft.setdefault(f"{p.kind}-{p.state}", []).append((p.t0 - self.t_start, p.ttft_ms()))
        factor = 1.1 if gpu else 1.5
        base = pct(quiet, 0.5)
        rows = [{"metric": "decode step, no loads", "n": len(quiet), "p50": base, "p99": pct(quiet, 0.99)}]
        for label, xs in (("decode step, loads at start", at_start), ("decode step, overlapping a load", overlap)):
            p99 = pct(xs, 0.99)
            rows.append({"metric": label, "n": len(xs), "p50": pct(xs, 0.5), "p99": p99,
                         "target": f"p99 <= {factor}x no-load p50 = {factor * base:.2f}",
                         "status": "-" if p99 is None else "ok" if p99 <= factor * base else "MISSED"})  # fmt: skip
        for label, xs in (("  of which overlapping a conversion", conv_steps), ("  of which overlapping writes only", write_steps)):
            rows.append({"metric": label, "n": len(xs), "p50": pct(xs, 0.5), "p99": pct(xs, 0.99)})
        paired = self.paired([s for s in dec if not any(s[2:])], [s for s in dec if s[3] or s[4]])
        warm = [v for _, v in ttft.get("warm-device", []) if v is not None]
        quiet_warm = [p.ttft_ms() for p in self.probes if p.kind == "warm" and p.phase.startswith("quiet") and p.state == "device"]
        rows.append({"metric": "TTFT warm, quiet phase", "n": len(quiet_warm), "p50": pct(quiet_warm, 0.5), "p99": pct(quiet_warm, 0.99)})
        for key, label in (("warm-device", "TTFT warm, all phases"), ("cold-disk", "TTFT cold from disk"), ("cold-host", "TTFT cold from host cache")):
            xs = [v for _, v in ttft.get(key, []) if v is not None]
            rows.append({"metric": label, "n": len(xs), "p50": pct(xs, 0.5), "p99": pct(xs, 0.99)})
        host = rows[-1]
        if host["p50"] is not None and warm:
            limit = pct(warm, 0.5) + 20
            met = host["p50"] <= limit
            host["target"] = f"p50 <= warm p50 + 20 = {limit:.2f}" + ("" if gpu else " (GPU target)")
            host["status"] = ("ok" if met else "MISSED") if gpu else ("info: met" if met else "info: over")
        s = self.engine.stats()
        conv = [1e3 * (e - b) for b, e, k, _ in self.loads if k == "convert"]
        write = [1e3 * (e - b) for b, e, k, _ in self.loads if k == "write"]
        copy = [1e3 * (e - b) for b, e, k, _ in self.loads if k == "copy"]
        converted = [a for *_, k, a in self.loads if k == "convert"]
        repeats = {a: converted.count(a) for a in sorted(set(converted)) if converted.count(a) > 1}
        mislabeled = {k: len(v) for k, v in ttft.items() if k not in ("warm-device", "cold-disk", "cold-host")}
        return {"rows": rows, "ttft_points": ttft, "phases": {k: [a - self.t_start, b - self.t_start] for k, (a, b) in self.phases.items()},
                "step_points": [(t0 - self.t_start, 1e3 * (t1 - t0), start, conv or wr) for t0, t1, start, conv, wr in dec],
                "paired_ratio": {"p50": pct(paired, 0.5), "p99": pct(paired, 0.99), "n": len(paired), "target": factor, "neighbours": NEIGHBOURS},
                "convert_ms_p50": pct(conv, 0.5), "write_ms_p50": pct(write, 0.5), "copy_ms_p50": pct(copy, 0.5), "converts": len(conv), "writes": len(write), "converted_more_than_once": repeats,
                "unexpected_probe_states": mislabeled, "host_cache_bytes": self.engine.adapters.host.nbytes,
                "host_cache_budget": self.engine.adapters.host.budget_bytes, "stats": dataclasses.asdict(s),
                "failed_probes": sum(p.handle.finished.error is not None for p in self.probes)}  # fmt: skip


def make_engine(args, tmp: Path):
    from loraplex.server.engine.config import EngineConfig
    from loraplex.server.engine.engine import Engine

    if args.model_shape == "tiny":
        model_dir = TINY
    else:
        model_dir = args.model_dir or tmp / "model"
        if not (model_dir / "model.safetensors").exists():
            engine_e2e.write_model_dir(model_dir, engine_e2e.LLAMA3_8B_8L, args.device)
    root = tmp / "adapters"
    root.mkdir()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    for group, k, seed in (("warm", args.warm_adapters, 0), ("cold", args.cold_adapters, 1)):
        engine_e2e.write_lora_dirs(model_dir, tmp / group, k, args.rank, seed=seed, dtype=dtype, device=args.device)
        for i in range(k):  # a0.. -> warm0.., cold0..: one root, distinct ids
            (tmp / group / f"a{i}").rename(root / f"{group}{i}")
    slots = args.warm_adapters + COLD_ROOM
    c = json.loads((model_dir / "config.json").read_text())
    s = engine_e2e.Shape(c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                         c["num_key_value_heads"], c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"], c["vocab_size"])  # fmt: skip
    size = 2 if args.device == "cuda" else 4
    per = s.layers * sum((16 * -(-args.rank // 16)) * (i + o) + 2 * o for i, o in s.module_shapes().values()) * size
    pool = max(256 << 20, int(1.25 * slots * per))
    host = max(1 << 30, int(1.25 * (args.warm_adapters + args.cold_adapters) * per))
    max_pos = c["max_position_embeddings"]
    cfg = EngineConfig(model_dir=model_dir, adapter_root=root, device=args.device, adapter_slots=slots, max_rank=max(16, args.rank),
                       adapter_pool_bytes=pool, host_cache_bytes=host, max_running=max(64, 2 * args.decode_requests),
                       kv_cache_tokens=args.decode_requests * max_pos + 64 * 32, cpu_threads=args.cpu_threads)  # fmt: skip
    engine = Engine.from_config(cfg)  # registers every directory under the root
    return engine, [f"warm{i}" for i in range(args.warm_adapters)], [f"cold{i}" for i in range(args.cold_adapters)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--warm-adapters", type=int, default=8)
    p.add_argument("--cold-adapters", type=int, default=50)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--decode-requests", type=int, default=32, help="steady decoders over the warm adapters")
    p.add_argument("--decode-tokens", type=int, default=128, help="decoders' max_new_tokens (staggered, refilled as they finish)")
    p.add_argument("--arrival-ms", type=float, default=100.0, help="gap between cold requests")
    p.add_argument("--quiet-probes", type=int, default=30, help="warm probes in the quiet phase (3 arrival gaps apart)")
    p.add_argument("--cpu-threads", type=int, default=1, help="EngineConfig.cpu_threads")
    p.add_argument("--model-shape", choices=("tiny", "llama3-8b-8layer"), default="tiny")
    p.add_argument("--model-dir", type=Path, default=None, help="llama3-8b-8layer: reuse (or create here) the model directory")
    p.add_argument("--json", type=Path, default=None, help="result path (default bench/results/cold_adapter-<time>.json)")
    p.add_argument("--png", type=Path, default=None, help="plot path (default: beside the JSON)")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model_shape != "tiny" and args.device != "cuda":
        print("cold_adapter: --model-shape llama3-8b-8layer needs --device cuda", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        engine, warm, cold = make_engine(args, Path(tmp))
        # AdapterManager.register (what register_adapter_root calls) converts each directory once
        # on a background validator without caching it; wait, so that it overlaps nothing measured
        wait_validated = getattr(engine.adapters, "wait_validated", None)  # absent where add() registers eagerly
        if wait_validated is not None:
            wait_validated(600)
        for name in cold:  # cold: on disk only (add() would have cached it); the first use converts it on the loader thread
            engine.adapters.host.drop(engine.adapters.key_of(name))
        bench = Bench(args, engine, warm, cold)
        print(f"[{time.monotonic() - t_start:5.1f}s] engine built, {len(warm)} warm + {len(cold)} cold adapters registered",
              file=sys.stderr, flush=True)  # fmt: skip
        engine.start()
        try:
            engine.warmup()
            for h in [bench.submit(w, PROBE_PROMPT, 1) for w in warm]:  # the warm adapters: resident
                h.result(120)
            bench.run()
            out = bench.results()
        finally:
            engine.shutdown(1)
    device = torch.device(args.device)
    st = out["stats"]
    print(f"{args.decode_requests} decoders over {len(warm)} warm rank-{args.rank} adapters; {len(cold)} cold adapters "
          f"every {args.arrival_ms:.0f} ms, from disk then from the host cache; {args.model_shape} on "
          f"{common.environment(device)['device']}, cpu_threads {args.cpu_threads}")  # fmt: skip
    common.print_table(out["rows"], [("metric", "metric", "s"), ("n", "n", "d"), ("p50", "p50 ms", ".2f"), ("p99", "p99 ms", ".2f"),
                                     ("target", "target (ms)", "s"), ("status", "status", "s")])  # fmt: skip
    print(f"host cache {out['host_cache_bytes'] / 2**20:.1f} MiB of {out['host_cache_budget'] / 2**20:.0f} MiB; "
          f"adapter loads {st['adapter_loads']}, evictions {st['adapter_evictions']}, load failures {st['adapter_load_failures']}, "
          f"preemptions {st['preemptions']}, steps {st['steps']}; loader conversions {out['converts']} "
          f"(p50 {out['convert_ms_p50'] or 0:.1f} ms), device writes {out['writes']} (p50 {out['write_ms_p50'] or 0:.2f} ms"
          + (f"; their copies on the device p50 {out['copy_ms_p50']:.2f} ms)" if out["copy_ms_p50"] is not None else ")"))  # fmt: skip
    pr = out["paired_ratio"]
    if pr["n"]:
        print(f"steps overlapping a load over the median of the {pr['neighbours']} no-load steps nearest in time (the drift of the "
              f"step's cost taken out): p50 {pr['p50']:.2f}x, p99 {pr['p99']:.2f}x, n {pr['n']} (target p99 <= {pr['target']}x)")  # fmt: skip
    if out["converted_more_than_once"]:
        print(f"note: adapters converted more than once by the loader: {out['converted_more_than_once']}")
    if out["unexpected_probe_states"] or out["failed_probes"]:
        print(f"note: probes in unexpected states {out['unexpected_probe_states']}, failed probes {out['failed_probes']}")
    payload = {"bench": "cold_adapter", "env": common.environment(device), "args": {k: str(v) for k, v in vars(args).items()}, **out}
    path = common.write_json(args.json, "cold_adapter", payload)
    print(f"wrote {path}", file=sys.stderr)
    steps = out["step_points"]
    panels = [("decode step (ms)", {"no loads": [(t, v) for t, v, s, o in steps if not s and not o],
                                    "loads in flight": [(t, v) for t, v, s, o in steps if s or o]}),
              ("TTFT (ms)", {k: [(t, v) for t, v in pts if v is not None] for k, pts in out["ttft_points"].items()})]  # fmt: skip
    png = common.write_png(args.png or path.with_suffix(".png"), "cold adapters under steady decode", panels)
    if png:
        print(f"wrote {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
