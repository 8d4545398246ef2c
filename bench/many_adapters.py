"""Many adapters: what registering thousands costs, and throughput as the adapters in
rotation grow from 1 to 1,000 at a fixed offered load.

    python bench/many_adapters.py                       # tiny bundled model, CPU
    python bench/many_adapters.py --dirs 10000 --rotation 1 10 100 1000

1. Start-up: `--dirs` adapter directories under one root (each its own config, all
   hard-linking one weights file, so the disk holds one copy) are registered by
   `Engine.register_adapter_root`, from their configs; reported: the registration time,
   the process RSS before and after, and how fast the background validator then works
   through them.
2. Rotation: for each N in `--rotation`, `--requests` greedy requests cycle through N
   distinct rank-`--rank` LoRA adapters (request i uses adapter i mod N), submitted at a
   fixed rate (`--rate` requests/s); reported: generated tokens/s, mean and p99 time to
   first token, device loads and evictions, host-cache bytes. The loss from 1 to the
   largest N is the figure the issue asks for (target on a GPU: ≤ 10%). With 1,000
   adapters and 400 requests every request is an adapter's first use, converted from
   disk while the background validator converts the others; `--warm-host` first lets the
   validator put every adapter in the host cache (S-LoRA's case: adapters in host
   memory), so that the rotation measures only the device slots' churn.

Prints tables, writes JSON (and a PNG of tokens/s against N) under bench/results/.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    from bench import common  # python -m bench.many_adapters
except ImportError:
    import common  # python bench/many_adapters.py

import loraplex

TINY = Path(loraplex.__file__).parent / "assets" / "tiny-llama"
SUPPORT = Path(__file__).resolve().parent.parent / "tests" / "support"


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_dirs(src: Path, root: Path, n: int, prefix: str) -> list[str]:
    """n adapter directories under root: a copy of src's config, its weights hard-linked."""
    names = []
    for i in range(n):
        d = root / f"{prefix}{i:05d}"
        d.mkdir(parents=True)
        shutil.copyfile(src / "adapter_config.json", d / "adapter_config.json")
        os.link(src / "adapter_model.safetensors", d / "adapter_model.safetensors")
        names.append(d.name)
    return names


def engine_for(args, adapter_root: Path | None, slots: int):
    from loraplex.server.engine.config import EngineConfig
    from loraplex.server.engine.engine import Engine

    return Engine.from_config(EngineConfig(model_dir=TINY, adapter_root=adapter_root, device=args.device, adapter_slots=slots,
                                           max_rank=max(16, args.rank), kv_cache_tokens=8192, max_running=64,
                                           max_queue=args.requests + 8, cpu_threads=args.cpu_threads))  # fmt: skip


def startup(args, src: Path, tmp: Path) -> dict:
    root = tmp / "startup"
    t0 = time.monotonic()
    make_dirs(src, root, args.dirs, "s")
    made = time.monotonic() - t0
    engine = engine_for(args, None, slots=16)
    rss0 = rss_mib()
    t0 = time.monotonic()
    engine.register_adapter_root(root)
    registered = time.monotonic() - t0
    rss1 = rss_mib()
    t0 = time.monotonic()
    engine.adapters.wait_validated(timeout=args.validate_seconds)
    validating = time.monotonic() - t0
    done = sum(i.validated for i in engine.adapters.list())
    engine.shutdown(0.5)
    return dict(dirs=args.dirs, make_s=made, register_s=registered, rss_before_mib=rss0, rss_after_mib=rss1,
                validated=done, validate_s=validating, validated_per_s=done / validating if validating else None)  # fmt: skip


def rotation(args, src: Path, tmp: Path, n: int) -> dict:
    from loraplex.server.engine.request import GenerationRequest, SamplingParams

    root = tmp / f"rot{n}"
    names = make_dirs(src, root, n, "r")
    engine = engine_for(args, root, slots=args.slots)
    engine.start()
    try:
        engine.warmup()
        if args.warm_host:
            engine.adapters.wait_validated(timeout=args.validate_seconds)
        warm = engine.stats().adapters_host_cached
        ids = engine.tokenizer.encode("the cat sees the")
        params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
        handles, start = [], time.monotonic()
        for i in range(args.requests):
            wait = start + i / args.rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            handles.append(engine.submit(GenerationRequest(ids, params, adapter_id=names[i % n])))
        ttfts, tokens = [], 0
        for h in handles:
            first = None
            for ev in h.events(timeout=600):
                if first is None and getattr(ev, "token_ids", ()) and not hasattr(ev, "finish_reason"):
                    first = ev.time - h.request.arrival
            final = h.finished
            tokens += final.generated_tokens
            ttfts.append(first if first is not None else final.time - h.request.arrival)
        wall = time.monotonic() - start
        s = engine.stats()
        return dict(adapters=n, requests=args.requests, tokens=tokens, wall_s=wall, tok_s=tokens / wall,
                    ttft_mean_ms=1e3 * statistics.mean(ttfts), ttft_p99_ms=1e3 * sorted(ttfts)[int(0.99 * (len(ttfts) - 1))],
                    loads=s.adapter_loads, evictions=s.adapter_evictions, host_cached=s.adapters_host_cached,
                    host_bytes=engine.adapters.host.nbytes, host_cached_at_start=warm)  # fmt: skip
    finally:
        engine.shutdown(1.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dirs", type=int, default=10_000, help="adapter directories registered at start-up (0: skip)")
    p.add_argument("--validate-seconds", type=float, default=60.0, help="how long to let the background validator run")
    p.add_argument("--rotation", type=int, nargs="*", default=[1, 10, 100, 1000], help="distinct adapters in rotation")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--rate", type=float, default=40.0, help="offered load, requests/s")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--slots", type=int, default=16, help="device adapter slots of the rotation engines (max_running is 64)")
    p.add_argument("--cpu-threads", type=int, default=1)
    p.add_argument("--warm-host", action="store_true",
                   help="before each rotation, wait (up to --validate-seconds) until the validator has every adapter in the host cache")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, str(SUPPORT))
    from lora_dirs import write_lora

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        src = write_lora(tmp / "src", rank=args.rank, seed=1)
        result: dict = {"bench": "many_adapters", "env": common.environment(torch.device(args.device))}
        if args.dirs:
            s = result["startup"] = startup(args, src, tmp)
            print(f"start-up: {s['dirs']} directories registered in {s['register_s']:.2f} s "
                  f"(RSS {s['rss_before_mib']:.0f} -> {s['rss_after_mib']:.0f} MiB); background validation: "
                  f"{s['validated']} in {s['validate_s']:.1f} s ({s['validated_per_s'] or 0:.0f}/s)", flush=True)  # fmt: skip
        rows = []
        for n in args.rotation:
            rows.append(rotation(args, src, tmp, n))
            print(f"  {n} adapters: {rows[-1]['tok_s']:.0f} tok/s", file=sys.stderr, flush=True)
        if rows:
            base = rows[0]["tok_s"]
            for r in rows:
                r["vs_first"] = r["tok_s"] / base
            common.print_table(rows, [("adapters", "adapters", "d"), ("tok_s", "tok/s", ".0f"), ("vs_first", "× first", ".3f"),
                                      ("ttft_mean_ms", "TTFT ms", ".1f"), ("ttft_p99_ms", "p99 TTFT ms", ".1f"),
                                      ("loads", "loads", "d"), ("evictions", "evictions", "d"),
                                      ("host_cached_at_start", "host cached at start", "d"), ("host_cached", "host cached", "d")])  # fmt: skip
            result["rotation"] = rows
        path = common.write_json(args.json, "many_adapters", result)
        if rows:
            common.write_png(path.with_suffix(".png"), "tokens/s against adapters in rotation",
                             [("tok/s", {"loraplex": [(r["adapters"], r["tok_s"]) for r in rows]})], xlabel="adapters in rotation")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
