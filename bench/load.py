"""Load and churn against a loraplex server on loopback: is anything lost, does anything
fail, does memory stay flat?

    python bench/load.py --duration 20                          # starts a server (tiny model, CPU)
    python bench/load.py --duration 600 --clients 16 --adapters 8
    python bench/load.py --duration 300 --adapters 1000 --adapter-weights 8 --server-arg=--host-cache-mb=64
    python bench/load.py --target 127.0.0.1:50051 --admin-token T --metrics-url http://127.0.0.1:9090/metrics --server-pid 1234

Without --target it starts `loraplex serve` as a child process (port 0, a temporary
adapter root, --insecure-admin on 127.0.0.1, few adapter slots so that LRU eviction
runs), and stops it with SIGTERM at the end (its exit code is reported).

--clients threads each send GenerateStream requests back to back (greedy, ignore_eos,
--max-new-tokens) for adapters picked with zipf popularity over --adapters slots (and
--base-fraction for the base model). Meanwhile a churn thread, every --churn-interval
seconds, uploads a new adapter (PEFT LoRA made up front, bench/load_adapters.py),
puts it into the next slot, and unloads (deleting the files) the adapter it displaced,
possibly while requests for it run. A request for an adapter already unloaded may
get NOT_FOUND: counted as "expected NOT_FOUND (churn)", not as a failure.

Every request gets a client-side id when sent and must end with a finish chunk or a
gRPC status from the server: "lost" counts those that did neither (never answered, the
stream ended without a finish, or the far-off --request-timeout passed; the server-side
status counts on /metrics tell the same story from the other end). "inconsistent" counts completed requests whose tokens differ from
the first completion for the same adapter weights and prompt (greedy is deterministic,
whatever the batch). The server's RSS is sampled (/proc/<pid>/status) every
--rss-interval seconds. The bar: zero lost, zero INTERNAL, flat memory.

Bounded by --duration seconds and --max-requests; each request by --request-timeout.
Every --progress-interval seconds it prints a line to stderr (elapsed, sent, completed,
lost so far, failures by code, server RSS). At the end it prints tables, writes JSON to
bench/results/load-<time>.json (or --json), and beside it a PNG of the server's RSS and
the completed requests/s over time (matplotlib, of the dev extras). Reports, never asserts.
"""

from __future__ import annotations

import argparse
import itertools
import os
import queue
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

try:
    from bench import common, load_adapters  # python -m bench.load
except ImportError:
    import common  # python bench/load.py
    import load_adapters

from loraplex.client import LoraplexClient

PROMPTS = (
    "Once upon a time",
    "The quick brown fox jumps over the lazy dog, and then",
    "In a village of la Mancha, the name of which I have no desire to call to mind, there lived",
    "Q: What is a low-rank adapter?\nA:",
    "def fibonacci(n):\n    " + "# compute the sequence\n    " * 6,
)
NOT_FOUND = "NOT_FOUND"


@dataclass
class Outcome:
    rid: int
    adapter: str  # "" = base model
    weights: str  # which adapter directory (or "base"): equal weights give equal tokens
    prompt: int  # index into PROMPTS
    sent: float  # time.monotonic()
    first_token: float | None = None
    done: float | None = None
    code: str | None = None  # "OK", a gRPC status name, "NO_FINISH" or "CLIENT:<exception>"
    tokens: tuple[int, ...] = ()
    server_request_id: str = ""


class Adapters:
    """The adapters in play: `slots[i]` = (adapter id, weights key); slot i has zipf weight
    1/(i+1)^s. `retired` holds every id swapped out (before it is unloaded)."""

    def __init__(self, slots: list[tuple[str, str]], zipf_s: float, base_fraction: float):
        self.slots = list(slots)
        self.weights = [1 / (i + 1) ** zipf_s for i in range(len(slots))]
        self.base_fraction = base_fraction
        self.retired: set[str] = set()
        self._lock = threading.Lock()

    def pick(self, rng: random.Random) -> tuple[str, str]:
        with self._lock:
            if not self.slots or rng.random() < self.base_fraction:
                return "", "base"
            return rng.choices(self.slots, weights=self.weights)[0]

    def replace(self, i: int, new: tuple[str, str]) -> tuple[str, str]:
        with self._lock:
            old, self.slots[i] = self.slots[i], new
            self.retired.add(old[0])
            return old

    def current(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self.slots)

    def was_retired(self, adapter_id: str) -> bool:
        with self._lock:
            return adapter_id in self.retired


# -- the server -------------------------------------------------------------------------------
class ServerProcess:
    """`loraplex serve` as a child process on 127.0.0.1 with any free ports."""

    def __init__(self, args, work: Path):
        self.log_path = work / "server.log"
        root = work / "adapter-root"
        cmd = [sys.executable, "-m", "loraplex.server.cli", "serve", "--host", "127.0.0.1", "--port", "0",
               "--metrics-port", "0", "--adapter-root", str(root), "--no-demo-adapters", "--insecure-admin",
               "--adapter-slots", str(args.adapter_slots), "--max-running", str(args.max_running),
               "--max-queue", str(args.max_queue), "--max-rank", str(max(8, args.rank)),
               "--shutdown-grace", "10", "--log-level", "WARNING", *args.server_arg]  # fmt: skip
        self.command = cmd
        # cwd outside the repository: `python -m` puts the cwd first on sys.path
        self.proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=self.log_path.open("w"), text=True)
        self.pid = self.proc.pid
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout], daemon=True).start()
        self.target = self.metrics_url = None
        deadline = time.monotonic() + args.start_timeout
        while self.target is None:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.kill()
                raise RuntimeError(f"the server did not start; log:\n{self.log_path.read_text()[-3000:]}")
            try:
                line = lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if m := re.search(r"metrics: (http://\S+/metrics)", line):
                self.metrics_url = m.group(1)
            if m := re.search(r"serving on (\S+)", line):
                self.target = m.group(1)

    def stop(self, timeout: float) -> int | None:
        """SIGTERM (drain), then the exit code; None if it had to be killed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log_errors(self) -> list[str]:
        """Each ERROR/CRITICAL record of the server's log, with its traceback."""
        records, current = [], None
        for line in self.log_path.read_text(errors="replace").splitlines():
            if re.match(r"\d{4}-\d\d-\d\d ", line):  # a new record
                current = None
                if " ERROR " in line or " CRITICAL " in line:
                    current = [line]
                    records.append(current)
            elif current is not None:
                current.append(line)
        return ["\n".join(r) for r in records]


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def scrape(metrics_url: str | None) -> dict[tuple[str, tuple], float]:
    if not metrics_url:
        return {}
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    except OSError:
        return {}
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


GAUGES = ("loraplex_running_requests", "loraplex_queue_depth", "loraplex_kv_blocks_used",
          "loraplex_adapters_resident", "loraplex_adapters_known")  # fmt: skip


def wait_gauges(metrics_url: str | None, timeout: float, zero: tuple[str, ...]) -> dict[str, float]:
    """Polls the engine gauges until those named in `zero` are 0 (or timeout); returns them."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(metrics_url)
        gauges = {n: m.get((n, ())) for n in GAUGES}
        if not m or all(gauges[n] == 0 for n in zero) or time.monotonic() > deadline:
            return gauges
        time.sleep(0.2)


# -- the load ------------------------------------------------------------------------------------
class Load:
    def __init__(self, args, target: str, adapters: Adapters, churn_dirs: list[Path], run_tag: str, admin_token):
        self.args = args
        self.target = target
        self.adapters = adapters
        self.churn_dirs = churn_dirs
        self.run_tag = run_tag
        self.admin_token = admin_token
        self.outcomes: dict[int, Outcome] = {}
        self.reference: dict[tuple[str, int], tuple[int, ...]] = {}
        self.inconsistent: list[int] = []
        self.churn = Counter()  # uploads, unloads, and errors by code
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.stop = threading.Event()
        self.end = 0.0

    def _next_id(self) -> int | None:
        with self._lock:
            rid = next(self._ids)
            return rid if rid < self.args.max_requests else None

    def client_loop(self, index: int) -> None:
        rng = random.Random(self.args.seed * 1000 + index)
        with LoraplexClient(self.target, timeout=self.args.request_timeout) as client:
            while not self.stop.is_set() and time.monotonic() < self.end:
                rid = self._next_id()
                if rid is None:
                    return
                adapter, weights = self.adapters.pick(rng)
                o = Outcome(rid, adapter, weights, rng.randrange(len(PROMPTS)), time.monotonic())
                with self._lock:
                    self.outcomes[rid] = o
                self._one(client, o)

    def _one(self, client: LoraplexClient, o: Outcome) -> None:
        tokens: list[int] = []
        code = "NO_FINISH"
        try:
            stream = client.generate_stream(PROMPTS[o.prompt], o.adapter, max_new_tokens=self.args.max_new_tokens, ignore_eos=True)
            for chunk in stream:
                if chunk.token_ids and o.first_token is None:
                    o.first_token = time.monotonic()
                tokens.extend(chunk.token_ids)
                o.server_request_id = chunk.request_id
                if chunk.finish_reason is not None:
                    code = "OK" if chunk.finish_reason in ("length", "stop") else f"FINISH_{chunk.finish_reason.upper()}"
        except grpc.RpcError as e:
            code = e.code().name
        except Exception as e:  # noqa: BLE001 — reported, not raised: the run goes on
            code = f"CLIENT:{type(e).__name__}"
        o.tokens, o.done, o.code = tuple(tokens), time.monotonic(), code
        if code == "OK":
            key = (o.weights, o.prompt)
            with self._lock:
                expected = self.reference.setdefault(key, o.tokens)
                if expected != o.tokens:
                    self.inconsistent.append(o.rid)

    def churn_loop(self) -> None:
        if not self.churn_dirs or not self.adapters.slots:
            return
        with LoraplexClient(self.target, admin_token=self.admin_token, timeout=60) as admin:
            for n in itertools.count():
                if self.stop.wait(self.args.churn_interval) or time.monotonic() >= self.end:
                    return
                src = self.churn_dirs[n % len(self.churn_dirs)]
                new_id = f"{self.run_tag}-churn-{n}"
                try:
                    admin.upload_adapter(new_id, src, timeout=60)
                    self.churn["uploads"] += 1
                except grpc.RpcError as e:
                    self.churn[f"upload {e.code().name}"] += 1
                    continue
                old_id, _ = self.adapters.replace(n % len(self.adapters.slots), (new_id, src.name))
                try:
                    admin.unload_adapter(old_id, delete_files=True)
                    self.churn["unloads"] += 1
                except grpc.RpcError as e:
                    self.churn[f"unload {e.code().name}"] += 1

    def progress(self, t0: float, pid: int | None) -> dict:
        """The counts so far: one progress line, and a point of the requests/s series."""
        with self._lock:
            outs = list(self.outcomes.values())
        codes = Counter(o.code for o in outs if o.code is not None)
        lost = sum(codes.get(c, 0) for c in ("NO_FINISH", "DEADLINE_EXCEEDED"))
        expected_nf = sum(1 for o in outs if o.code == NOT_FOUND and self.adapters.was_retired(o.adapter))
        failed = Counter({c: n for c, n in codes.items() if c not in ("OK", "NO_FINISH", "DEADLINE_EXCEEDED")})
        failed[NOT_FOUND] -= expected_nf
        return {"t": time.monotonic() - t0, "sent": len(outs), "completed": codes.get("OK", 0), "lost": lost,
                "failed": dict(+failed), "rss_mb": rss_mb(pid)}  # fmt: skip

    def progress_loop(self, t0: float, pid: int | None, points: list[dict]) -> None:
        """Every --progress-interval s until the load stops: a line on stderr, a point in `points`."""
        while not self.stop.wait(self.args.progress_interval):
            p = self.progress(t0, pid)
            prev = points[-1] if points else {"t": 0.0, "completed": 0}
            p["requests_per_s"] = (p["completed"] - prev["completed"]) / max(p["t"] - prev["t"], 1e-9)
            points.append(p)
            failed = " ".join(f"{c}={n}" for c, n in sorted(p["failed"].items())) or "none"
            rss = "-" if p["rss_mb"] is None else f"{p['rss_mb']:.0f} MiB"
            print(f"[{p['t']:6.0f}s] sent {p['sent']}  completed {p['completed']} ({p['requests_per_s']:.1f}/s)  "
                  f"lost {p['lost']}  failed {failed}  churn {dict(self.churn) or '-'}  server RSS {rss}",
                  file=sys.stderr, flush=True)  # fmt: skip

    def completed_per_s(self, t0: float, bin_s: float) -> list[tuple[float, float]]:
        """Completed requests/s in bins of `bin_s` seconds: [(bin middle s, rate)]."""
        with self._lock:
            bins = Counter(int((o.done - t0) // bin_s) for o in self.outcomes.values() if o.code == "OK")
        return [((i + 0.5) * bin_s, bins.get(i, 0) / bin_s) for i in range(max(bins, default=-1) + 1)]

    def summary(self, t0: float, wall: float) -> dict:
        outs = list(self.outcomes.values())
        codes = Counter(o.code for o in outs if o.code is not None)
        expected_nf = sum(1 for o in outs if o.code == NOT_FOUND and self.adapters.was_retired(o.adapter))
        # The deadline (--request-timeout) is far beyond any normal latency: running into it
        # means the server never answered, so it counts as lost, not as a failure.
        failed = Counter({c: n for c, n in codes.items() if c not in ("OK", "NO_FINISH", "DEADLINE_EXCEEDED")})
        failed[NOT_FOUND] -= expected_nf
        failed = +failed  # drops zero counts
        ok = [o for o in outs if o.code == "OK"]
        lat = [o.done - o.sent for o in ok]
        ttft = [o.first_token - o.sent for o in ok if o.first_token is not None]
        # Rates over the time the server was answering, not over waits for lost requests.
        busy = max((o.done for o in outs if o.code not in (None, "NO_FINISH", "DEADLINE_EXCEEDED")), default=t0) - t0
        tokens = sum(len(o.tokens) for o in outs)
        return {
            "wall_s": wall,
            "busy_s": busy,
            "sent": len(outs),
            "completed": len(ok),
            "expected_not_found_churn": expected_nf,
            "failed": sum(failed.values()),
            "failed_by_code": dict(failed),
            "lost_never_answered": sum(1 for o in outs if o.code is None),
            "lost_no_finish": codes.get("NO_FINISH", 0),
            "lost_deadline": codes.get("DEADLINE_EXCEEDED", 0),
            "lost": sum(1 for o in outs if o.code in (None, "NO_FINISH", "DEADLINE_EXCEEDED")),
            "internal": codes.get("INTERNAL", 0),
            "inconsistent": len(self.inconsistent),
            "latency_p50_ms": _pct(lat, 50), "latency_p99_ms": _pct(lat, 99),
            "ttft_p50_ms": _pct(ttft, 50), "ttft_p99_ms": _pct(ttft, 99),
            "tokens": tokens,
            "tokens_per_s": tokens / busy if busy > 0 else 0.0,
            "requests_per_s": len(ok) / busy if busy > 0 else 0.0,
            "churn": dict(self.churn),
            "lost_requests": [asdict(o) for o in outs if o.code in (None, "NO_FINISH", "DEADLINE_EXCEEDED")][:50],
            "inconsistent_ids": self.inconsistent[:100],
        }  # fmt: skip


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return 1e3 * values[0]
    return 1e3 * statistics.quantiles(values, n=100, method="inclusive")[min(98, max(0, int(q) - 1))]


def sample_rss(pid: int | None, interval: float, t0: float, samples: list, stop: threading.Event) -> None:
    while not stop.wait(interval):
        value = rss_mb(pid)
        if value is not None:
            samples.append((time.monotonic() - t0, value))


# -- main -------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=None, help="connect to this server (host:port) instead of starting one")
    p.add_argument("--admin-token", default=os.environ.get("LORAPLEX_ADMIN_TOKEN"),
                   help="admin token of --target, for uploads and unloads (default: $LORAPLEX_ADMIN_TOKEN)")
    p.add_argument("--metrics-url", default=None, help="Prometheus URL of --target, for the final gauges and server-side counts")
    p.add_argument("--server-pid", type=int, default=None, help="pid of --target's process, for RSS samples")
    p.add_argument("--model", type=Path, default=load_adapters.TINY, help="the server's HF model directory (adapters are made on it)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="stop after sending this many requests")
    p.add_argument("--clients", type=int, default=16, help="concurrent streaming clients (threads, one channel each)")
    p.add_argument("--adapters", type=int, default=8, help="adapters in play at once (zipf popularity over them)")
    p.add_argument("--adapter-weights", type=int, default=None,
                   help="distinct PEFT weight sets made for them, cycled under distinct ids (default: one per adapter); "
                        "1,000 adapters need not mean making 1,000 with PEFT")  # fmt: skip
    p.add_argument("--zipf-s", type=float, default=1.1, help="zipf exponent of adapter popularity")
    p.add_argument("--base-fraction", type=float, default=0.1, help="share of requests for the base model (no adapter)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of the generated adapters")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per request (greedy, ignore_eos)")
    p.add_argument("--churn-interval", type=float, default=2.0, help="seconds between upload+unload rounds")
    p.add_argument("--churn-pool", type=int, default=6, help="distinct adapter weights for churn uploads (cycled under new ids)")
    p.add_argument("--no-churn", action="store_true", help="no uploads or unloads during the load")
    p.add_argument("--request-timeout", type=float, default=60.0, help="deadline of each request, seconds")
    p.add_argument("--rss-interval", type=float, default=5.0, help="seconds between server RSS samples")
    p.add_argument("--progress-interval", type=float, default=10.0, help="seconds between progress lines on stderr")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("the started server (without --target)")
    g.add_argument("--adapter-slots", type=int, default=4, help="device adapter slots (fewer than --adapters: evictions)")
    g.add_argument("--max-running", type=int, default=16)
    g.add_argument("--max-queue", type=int, default=64)
    g.add_argument("--server-arg", action="append", default=[], help="extra `loraplex serve` argument (repeatable; use --server-arg=--flag)")
    g.add_argument("--start-timeout", type=float, default=180.0, help="seconds to wait for the server to serve")
    p.add_argument("--json", type=Path, default=None, help="result path (default bench/results/load-<time>.json)")
    args = p.parse_args(argv)
    if args.clients < 1 or args.adapters < 0 or args.duration <= 0 or args.max_requests < 1 or (args.adapter_weights or 1) < 1:
        p.error("--clients ≥ 1, --adapters ≥ 0, --adapter-weights ≥ 1, --duration > 0 and --max-requests ≥ 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="loraplex-load-"))
    server = None
    try:
        t_make = time.monotonic()
        made = load_adapters.make_lora_adapters(work / "made", min(args.adapters, args.adapter_weights or args.adapters), args.rank,
                                                seed=args.seed * 1000, model_dir=args.model)  # fmt: skip
        churn_dirs = [] if args.no_churn else load_adapters.make_lora_adapters(
            work / "made", args.churn_pool, args.rank, seed=args.seed * 1000 + 500, model_dir=args.model, prefix="churn")
        print(f"made {len(made) + len(churn_dirs)} PEFT adapters in {time.monotonic() - t_make:.1f}s", file=sys.stderr)
        if args.target is None:
            server = ServerProcess(args, work)
            target, metrics_url, pid, token = server.target, server.metrics_url, server.pid, None
            print(f"started server pid {pid} on {target} ({metrics_url})", file=sys.stderr)
        else:
            target, metrics_url, pid, token = args.target, args.metrics_url, args.server_pid, args.admin_token
        run_tag = f"load{os.getpid()}"
        with LoraplexClient(target, admin_token=token, timeout=60) as admin:
            admin.wait_ready(60)
            slots = []
            for i in range(args.adapters):
                path = made[i % len(made)]
                aid = f"{run_tag}-{path.name}" if len(made) == args.adapters else f"{run_tag}-{i}-{path.name}"
                admin.upload_adapter(aid, path, timeout=60)
                slots.append((aid, path.name))
            for aid, _ in slots:  # each loaded once, so the start RSS includes the pool at work
                admin.generate(PROMPTS[0], aid, max_new_tokens=2)
        adapters = Adapters(slots, args.zipf_s, args.base_fraction)
        load = Load(args, target, adapters, churn_dirs, run_tag, token)

        before = scrape(metrics_url)
        t0 = time.monotonic()
        rss_samples: list[tuple[float, float]] = []
        rss_start = rss_mb(pid)
        if rss_start is not None:
            rss_samples.append((0.0, rss_start))
        rss_stop = threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(pid, args.rss_interval, t0, rss_samples, rss_stop), daemon=True)
        sampler.start()
        load.end = t0 + args.duration
        threads = [threading.Thread(target=load.client_loop, args=(i,), name=f"client-{i}", daemon=True) for i in range(args.clients)]
        threads.append(threading.Thread(target=load.churn_loop, name="churn", daemon=True))
        progress: list[dict] = []
        reporter = threading.Thread(target=load.progress_loop, args=(t0, pid, progress), name="progress", daemon=True)
        for t in threads:
            t.start()
        reporter.start()
        try:
            for t in threads:
                t.join(max(0.0, load.end - time.monotonic()) + args.request_timeout + 30)
        except KeyboardInterrupt:
            print("interrupted: finishing the requests in flight", file=sys.stderr)
            load.stop.set()
            for t in threads:
                t.join(args.request_timeout + 30)
        wall = time.monotonic() - t0
        load.stop.set()
        reporter.join(5)
        stuck = [t.name for t in threads if t.is_alive()]

        idle = wait_gauges(metrics_url, 30, GAUGES[:3])
        rss_stop.set()
        sampler.join(args.rss_interval + 1)
        rss_end = rss_mb(pid)
        if rss_end is not None:
            rss_samples.append((time.monotonic() - t0, rss_end))
        after = scrape(metrics_url)
        with LoraplexClient(target, admin_token=token, timeout=60) as admin:  # leave the server as found
            for aid, _ in adapters.current():
                try:
                    admin.unload_adapter(aid, delete_files=True)
                except grpc.RpcError as e:
                    load.churn[f"cleanup unload {e.code().name}"] += 1
        # the engine frees the slots of unloaded adapters in its loop, shortly after
        after_unload = wait_gauges(metrics_url, 10, GAUGES[:4] if args.target is None else GAUGES[:3])
        rss_after_unload = rss_mb(pid)

        summary = load.summary(t0, wall)
        summary.update(stuck_threads=stuck, rss_start_mb=rss_start, rss_end_mb=rss_end, rss_after_unload_mb=rss_after_unload,
                       rss_max_mb=max((v for _, v in rss_samples), default=None), rss_samples=rss_samples,
                       gauges_after_load=idle, gauges_after_unload=after_unload,
                       server_stream_codes=_server_codes(before, after, "GenerateStream"), progress=progress,
                       completed_per_s=load.completed_per_s(t0, max(1.0, args.duration / 100)))  # fmt: skip
        if server is not None:
            summary["server_exit_code"] = server.stop(timeout=30)
            summary["server_log_errors"] = server.log_errors()[:50]
            summary["server_log_tail"] = server.log_path.read_text(errors="replace").splitlines()[-40:]
            summary["server_command"] = server.command
        report(args, summary)
        payload = {"env": _environment(), "args": {k: str(v) for k, v in vars(args).items()}, "summary": summary}
        written = common.write_json(args.json, "load", payload)
        print(f"wrote {written}", file=sys.stderr)
        png = plot(written.with_suffix(".png"), args, summary)
        if png is not None:
            print(f"wrote {png}", file=sys.stderr)
        return 0
    finally:
        if server is not None:
            server.kill()
        shutil.rmtree(work, ignore_errors=True)


def _server_codes(before: dict, after: dict, method: str) -> dict[str, int]:
    codes = {}
    for (name, labels), value in after.items():
        d = dict(labels)
        if name == "loraplex_requests_total" and d.get("method") == method:
            delta = int(value - before.get((name, labels), 0))
            if delta:
                codes[d["code"]] = delta
    return codes


def _environment() -> dict:
    try:
        import torch

        return common.environment(torch.device("cpu"))
    except Exception as e:  # noqa: BLE001 — the environment is informative only
        return {"error": str(e)}


def report(args, s: dict) -> None:
    mode = f"target {args.target}" if args.target else "started server (bundled model, CPU)"
    print(f"\nloraplex load: {args.clients} streaming clients, {args.adapters} adapters (zipf s={args.zipf_s}, "
          f"base {args.base_fraction:.0%}), {args.max_new_tokens} new tokens, churn every "
          f"{'-' if args.no_churn else args.churn_interval}s, {s['wall_s']:.0f}s ({s['busy_s']:.0f}s answering), {mode}")  # fmt: skip
    fmt = lambda v, spec="": "-" if v is None else format(v, spec)  # noqa: E731
    rows = [
        ("requests sent", fmt(s["sent"])),
        ("completed (OK)", fmt(s["completed"])),
        ("expected NOT_FOUND (churn)", fmt(s["expected_not_found_churn"])),
        ("failed", fmt(s["failed"]) + (f"  {s['failed_by_code']}" if s["failed_by_code"] else "")),
        ("  of which INTERNAL", fmt(s["internal"])),
        ("lost (no answer / no finish / deadline)", f"{s['lost']} ({s['lost_never_answered']} / {s['lost_no_finish']} / {s['lost_deadline']})"),
        ("inconsistent outputs", fmt(s["inconsistent"])),
        ("latency p50 / p99 ms", f"{fmt(s['latency_p50_ms'], '.1f')} / {fmt(s['latency_p99_ms'], '.1f')}"),
        ("TTFT p50 / p99 ms", f"{fmt(s['ttft_p50_ms'], '.1f')} / {fmt(s['ttft_p99_ms'], '.1f')}"),
        ("tokens/s (streamed)", fmt(s["tokens_per_s"], ".1f")),
        ("requests/s (completed)", fmt(s["requests_per_s"], ".1f")),
        ("churn", ", ".join(f"{k} {v}" for k, v in sorted(s["churn"].items())) or "-"),
        ("server-side GenerateStream codes", ", ".join(f"{k} {v}" for k, v in sorted(s["server_stream_codes"].items())) or "-"),
        ("server-side never ended (sent - counted)", fmt(s["sent"] - sum(s["server_stream_codes"].values()) if s["server_stream_codes"] else None)),
        ("server RSS MiB start / end / max", f"{fmt(s['rss_start_mb'], '.0f')} / {fmt(s['rss_end_mb'], '.0f')} / {fmt(s['rss_max_mb'], '.0f')}"),
        ("server RSS MiB after unloading all", fmt(s["rss_after_unload_mb"], ".0f")),
        ("gauges after load (run/queue/kv/resident)", _gauges(s["gauges_after_load"])),
        ("gauges after unload (run/queue/kv/resident)", _gauges(s["gauges_after_unload"])),
        ("stuck client threads", fmt(len(s["stuck_threads"]))),
    ]
    if "server_exit_code" in s:
        rows.append(("server exit code (SIGTERM)", fmt(s["server_exit_code"], "d") if s["server_exit_code"] is not None else "none: killed after 30 s"))
        rows.append(("server log errors", fmt(len(s["server_log_errors"]))))
    width = max(len(k) for k, _ in rows)
    print(f"{'metric':<{width}}  value")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    samples = s["rss_samples"]
    if samples:
        step = max(1, len(samples) // 10)
        picked = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
        print("\nserver RSS samples")
        common.print_table([{"t": t, "rss": v} for t, v in picked], [("t", "t s", ".0f"), ("rss", "RSS MiB", ".1f")])


def plot(path: Path, args, s: dict) -> Path | None:
    """The server's RSS and the completed requests/s over the run, as a PNG."""
    title = f"loraplex load: {args.clients} clients, {args.adapters} adapters, {s['wall_s']:.0f}s"
    return common.write_png(path, title, [("server RSS (MiB)", {"RSS": s["rss_samples"]}),
                                          ("completed requests/s", {"completed": s["completed_per_s"]})])  # fmt: skip


def _gauges(g: dict) -> str:
    keys = ("loraplex_running_requests", "loraplex_queue_depth", "loraplex_kv_blocks_used", "loraplex_adapters_resident")
    return " / ".join("-" if g.get(k) is None else f"{g[k]:.0f}" for k in keys)


if __name__ == "__main__":
    sys.exit(main())
