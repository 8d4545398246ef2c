"""loraplex on Ray Serve (loraplex.deploy): throughput with 1 and 2 replicas, and the
adapter-affinity hit rate under a zipf mix of adapters, through Ray's HTTP proxy and the
router (which routes by the body's `model`; no routing header is sent).

One local Ray instance (`--ray-cpus`, default 2). The app starts with 1 replica and is
scaled to 2 (`serve.run` again: the first replica stays). Per configuration: a warm-up
pass of the mix, then `--requests` requests from `--concurrency` client threads, each
naming a zipf-drawn adapter of `--adapters` (exponent `--zipf`) in `model`.

- throughput: requests/s and generated tokens/s over the timed pass (wall clock).
- hit rate: the share of requests that landed on a replica that already held their
  adapter in its device pool: 1 - (device loads during the pass, summed over the
  replicas' `loraplex_adapter_loads_total`) / requests.
- same-replica rate: from each response's `x-loraplex-replica` header, the share of
  requests served by the replica that served their adapter's previous request.
- baseline (on by default, `--no-baseline`): the same pass sent to any replica (a handle
  call without a multiplexed id, so no router either), the hit rate without affinity.

On a 2-core CPU the replicas share the cores with Ray, the proxy, the router and the
client, so expect little throughput gain from a second replica; the numbers are what
they are. Prints a table; writes JSON under bench/results/. No asserts.

    .venv/bin/python bench/ray_scale.py [--requests 240] [--adapters 50] [--slots 8] [--no-baseline]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import random
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "support"))
from common import print_table, write_json

import loraplex

TINY = Path(loraplex.__file__).parent / "assets" / "tiny-llama"
PROMPTS = ["The quick brown fox", "Once upon a time", "In a hole in the ground", "It was a dark and stormy night"]


def zipf_mix(n_adapters: int, n: int, s: float, seed: int) -> list[str]:
    weights = [1.0 / (k**s) for k in range(1, n_adapters + 1)]
    rng = random.Random(seed)
    return [f"z{k:02d}" for k in rng.choices(range(n_adapters), weights=weights, k=n)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _body(model: str, i: int, max_tokens: int) -> dict:
    return {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}  # fmt: skip


def via_router(url: str, model: str, i: int, max_tokens: int) -> tuple[int, str, int]:
    """(status, replica, completion tokens) of one request through the proxy and router."""
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(_body(model, i, max_tokens)).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            body, replica, status = json.loads(r.read()), r.headers.get("x-loraplex-replica", ""), r.status
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("x-loraplex-replica", ""), 0
    return status, replica, body.get("usage", {}).get("completion_tokens", 0)


def via_any_replica(handle, model: str, i: int, max_tokens: int) -> tuple[int, str, int]:
    """The same request through a handle with no multiplexed id (no affinity)."""
    raw = json.dumps(_body(model, i, max_tokens)).encode()
    request = {"type": "http", "http_version": "1.1", "method": "POST", "scheme": "http", "path": "/v1/completions",
               "raw_path": b"/v1/completions", "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
               "server": ("127.0.0.1", 80), "body": raw,
               "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]}  # fmt: skip
    r = handle.http.remote(request).result(timeout_s=120)
    replica = dict(r["headers"]).get(b"x-loraplex-replica", b"").decode()
    tokens = json.loads(r["body"]).get("usage", {}).get("completion_tokens", 0) if r["status"] == 200 else 0
    return r["status"], replica, tokens


def replica_loads(sd_dir: Path) -> dict[str, float]:
    """Per replica: loraplex_adapter_loads_total, from the file_sd targets the replicas write."""
    out = {}
    for f in sorted(sd_dir.glob("*.json")):
        (entry,) = json.loads(f.read_text())
        try:
            with urllib.request.urlopen(f"http://{entry['targets'][0]}/metrics", timeout=10) as r:
                text = r.read().decode()
        except OSError:
            continue  # a replica that stopped
        for line in text.splitlines():
            if line.startswith("loraplex_adapter_loads_total") and "replica=" in line:
                out[entry["labels"]["replica"]] = float(line.rsplit(" ", 1)[1])
    return out


def run_pass(send, mix: list[str], concurrency: int, max_tokens: int, sd_dir: Path) -> dict:
    before = replica_loads(sd_dir)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda im: send(im[1], im[0], max_tokens), enumerate(mix)))
    wall = time.perf_counter() - t0
    after = replica_loads(sd_dir)
    loads = sum(after.get(r, 0) - before.get(r, 0) for r in after)
    ok = [r for r in results if r[0] == 200]
    last: dict[str, str] = {}
    same = repeats = 0
    per_replica: dict[str, int] = {}
    for model, (status, replica, _) in zip(mix, results):
        if status != 200:
            continue
        per_replica[replica] = per_replica.get(replica, 0) + 1
        if model in last:
            repeats += 1
            same += last[model] == replica
        last[model] = replica
    return dict(requests=len(mix), ok=len(ok), wall_s=wall, req_s=len(ok) / wall, tok_s=sum(r[2] for r in ok) / wall,
                loads=loads, hit_rate=max(0.0, 1 - loads / len(mix)), same_replica=same / repeats if repeats else None,
                per_replica=per_replica, statuses=sorted({r[0] for r in results}))  # fmt: skip


def wait_replicas(sd_dir: Path, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(replica_loads(sd_dir)) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{n} replicas did not come up")
        time.sleep(0.5)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--requests", type=int, default=240)
    p.add_argument("--warmup", type=int, default=60, help="requests of the warm-up pass per configuration")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--adapters", type=int, default=50)
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--slots", type=int, default=8, help="adapter slots per replica (= max_num_models_per_replica)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--cpus-per-replica", type=float, default=0.9)
    p.add_argument("--device", default="cpu")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also the pass without affinity (any replica) on the largest configuration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import ray
    from lora_dirs import write_lora
    from ray import serve

    from loraplex.deploy import build_app

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as t:
        root, sd_dir = Path(t) / "adapters", Path(t) / "sd"
        for k in range(args.adapters):
            write_lora(root / f"z{k:02d}", rank=8, seed=1000 + k)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        engine = dict(device=args.device, quantize="nf4" if args.device == "cpu" else None, adapter_slots=args.slots,
                      max_rank=16, kv_cache_tokens=4096, max_batch_tokens=512, max_running=16, max_queue=64,
                      max_new_tokens=64, cpu_threads=1, host_cache_mb=256)  # fmt: skip
        engine = {k: v for k, v in engine.items() if v is not None}
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for n in args.replicas:
                t0 = time.perf_counter()
                gpus = 1 if args.device == "cuda" else 0
                serve.run(build_app(dict(engine, model=TINY, adapter_root=root, no_demo_adapters=True, replicas=n,
                                         num_cpus_per_replica=args.cpus_per_replica, num_gpus_per_replica=gpus,
                                         metrics_sd_dir=str(sd_dir))),
                          name="loraplex", route_prefix="/")  # fmt: skip
                wait_replicas(sd_dir, n)
                start_s = time.perf_counter() - t0
                send = lambda model, i, mt: via_router(url, model, i, mt)
                run_pass(send, zipf_mix(args.adapters, args.warmup, args.zipf, args.seed + 1), args.concurrency,
                         args.max_tokens, sd_dir)  # fmt: skip
                mix = zipf_mix(args.adapters, args.requests, args.zipf, args.seed + 2)
                row = dict(replicas=n, routing="router (model)", start_s=start_s,
                           **run_pass(send, mix, args.concurrency, args.max_tokens, sd_dir))  # fmt: skip
                rows.append(row)
                print(f"  {n} replica(s): {row['req_s']:.1f} req/s, hit rate {row['hit_rate']:.2f}", file=sys.stderr, flush=True)
                if args.baseline and n > 1 and n == max(args.replicas):
                    handle = serve.get_deployment_handle("LoraplexReplica", app_name="loraplex")
                    send_any = lambda model, i, mt, h=handle: via_any_replica(h, model, i, mt)
                    row = dict(replicas=n, routing="any replica", start_s=None,
                               **run_pass(send_any, mix, args.concurrency, args.max_tokens, sd_dir))  # fmt: skip
                    rows.append(row)
                    print(f"  {n} replica(s), no affinity: hit rate {row['hit_rate']:.2f}", file=sys.stderr, flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()

    base = next((r["req_s"] for r in rows if r["replicas"] == 1 and r["routing"].startswith("router")), None)
    for r in rows:
        r["speedup"] = r["req_s"] / base if base else None
    print(f"\nRay Serve scale-out: {args.requests} requests, {args.concurrency} clients, zipf({args.zipf}) over "
          f"{args.adapters} adapters, {args.slots} slots/replica, {args.max_tokens} tokens each, "
          f"{args.ray_cpus} Ray CPUs ({os.cpu_count()} cores here), device {args.device}")  # fmt: skip
    print_table(rows, [("replicas", "replicas", "d"), ("routing", "routing", "s"), ("req_s", "req/s", ".1f"),
                       ("tok_s", "tok/s", ".0f"), ("speedup", "vs 1", ".2f"), ("loads", "loads", ".0f"),
                       ("hit_rate", "hit rate", ".2f"), ("same_replica", "same replica", ".2f"),
                       ("start_s", "start s", ".1f")])  # fmt: skip
    payload = {"bench": "ray_scale", "args": {k: v if not isinstance(v, Path) else str(v) for k, v in vars(args).items()},
               "env": {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                       "python": platform.python_version(), "ray": ray.__version__},
               "rows": rows}  # fmt: skip
    path = write_json(args.json, "ray_scale", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
