"""Overload through a real server on loopback (CPU, the bundled tiny model): a full
queue refuses at once and says so on /metrics; requests over the limits or with
impossible parameters are refused before the queue; more adapters than device slots
are served correctly by LRU eviction and leave nothing behind once unloaded; SIGTERM
with streams in flight drains them and exits 0, cancelling what outlives the grace.

tests/server covers the simpler cases (a queue filled through engine.submit, a few bad
arguments, SIGTERM with one stream); these extend them. Fixtures live here, not in a
conftest: one server for the module, left as found by every test.
"""

from __future__ import annotations

import gc
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

import loraplex
from loraplex.client import LoraplexClient
from live_server import LiveServer, code_of

TINY = Path(loraplex.__file__).parent / "assets" / "tiny-llama"
ADMIN_TOKEN = "overload-admin-token"
PROMPT = "Once upon a time"
MAX_RUNNING, MAX_QUEUE, SLOTS, MAX_PROMPT = 2, 8, 2, 256
# Six adapters for two device slots; every PEFT type the server reads.
EVICTION_ADAPTERS = {"lora-a": ("lora", 11), "lora-b": ("lora", 12), "rslora": ("rslora", 13),
                     "dora": ("dora", 14), "vera": ("vera", 15), "adalora": ("adalora", 16)}  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> LiveServer:
    from loraplex.server.app import LoraplexServer, ServeConfig
    from loraplex.server.engine.config import EngineConfig

    engine = EngineConfig(
        model_dir=TINY, adapter_root=tmp_path_factory.mktemp("overload-root"), quantize="nf4", device="cpu",
        max_batch_tokens=256, max_running=MAX_RUNNING, max_queue=MAX_QUEUE, kv_cache_tokens=4096,
        adapter_slots=SLOTS, max_rank=32, max_prompt_tokens=MAX_PROMPT, max_new_tokens=1000,
    )  # fmt: skip
    server = LoraplexServer(ServeConfig(engine=engine, port=0, metrics_port=0, admin_token=ADMIN_TOKEN))
    server.start()
    try:
        server.warm_up()
        yield LiveServer(server, server.target)
    finally:
        server.stop(2.0)


@pytest.fixture
def client(served):
    with LoraplexClient(served.target, timeout=60) as c:
        yield c


@pytest.fixture
def admin(served):
    with LoraplexClient(served.target, admin_token=ADMIN_TOKEN, timeout=60) as c:
        yield c


# -- a full queue ---------------------------------------------------------------------------------
def test_full_queue_refuses_at_once_and_the_gauge_shows_the_cap(served, client):
    served.wait_idle()
    long = dict(max_new_tokens=900, ignore_eos=True, timeout=60)
    streams = []
    try:
        streams += [client.generate_stream(PROMPT, **long) for _ in range(MAX_RUNNING)]
        served.wait_for(lambda: served.engine.stats().running == MAX_RUNNING, 20, "a full running batch")
        streams += [client.generate_stream(PROMPT, **long) for _ in range(MAX_QUEUE)]
        served.wait_for(lambda: served.engine.stats().queue_depth == MAX_QUEUE, 20, "a full queue")
        before = served.scrape()

        refusals = [lambda: client.generate(PROMPT, max_new_tokens=4), lambda: list(client.generate_stream(PROMPT, "", max_new_tokens=4))]
        for call in refusals * 5:
            start = time.monotonic()
            assert code_of(call) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() - start < 1.0, "a refusal must not wait for room in the queue"

        after = served.scrape()
        assert after[("loraplex_queue_depth", ())] == MAX_QUEUE == after[("loraplex_queue_capacity", ())]
        assert after[("loraplex_running_requests", ())] == MAX_RUNNING
        for method in ("Generate", "GenerateStream"):
            key = ("loraplex_requests_total", (("code", "RESOURCE_EXHAUSTED"), ("frontend", "grpc"), ("method", method)))
            assert after[key] - before.get(key, 0.0) == 5
        s = served.engine.stats()
        assert (s.queue_depth, s.running) == (MAX_QUEUE, MAX_RUNNING), "refused requests must leave no trace"
    finally:
        for stream in streams:
            stream.cancel()
    served.wait_idle()
    assert client.generate(PROMPT, max_new_tokens=3, ignore_eos=True).generated_tokens == 3


# -- bad requests never reach the queue -------------------------------------------------------------
# Cases tests/server/test_generate_rpc.py does not have: the length limits, and non-finite
# or out-of-range numbers. (prompt, sampling parameters) per case.
REFUSED = {
    "text prompt over the limit": ("x" * (MAX_PROMPT + 1), {}),
    "token-id prompt over the limit": ([5] * (MAX_PROMPT + 1), {}),
    "1 MiB text prompt": ("y" * (1 << 20), {}),
    "prompt + max_new_tokens over the context": ("z" * 200, dict(max_new_tokens=900)),
    "max_new_tokens at uint32 max": (PROMPT, dict(max_new_tokens=2**32 - 1)),
    "17 stop strings": (PROMPT, dict(stop=[f"s{i}" for i in range(17)])),
    "stop string of 257 characters": (PROMPT, dict(stop=["s" * 257])),
    "NaN temperature": (PROMPT, dict(temperature=float("nan"))),
    "infinite temperature": (PROMPT, dict(temperature=float("inf"))),
    "temperature above 100": (PROMPT, dict(temperature=101.0)),
    "NaN top_p": (PROMPT, dict(top_p=float("nan"))),
    "negative top_p": (PROMPT, dict(top_p=-0.5)),
    "top_k above a million": (PROMPT, dict(top_k=2_000_000)),
    "seed of 2^63": (PROMPT, dict(seed=2**63)),
}


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_impossible_requests_are_refused_before_the_queue(served, client, monkeypatch, case, stream):
    engine = served.engine
    served.wait_idle()
    queued = []
    submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda r: queued.append(submit(r)) or queued[-1])
    before, scraped = engine.stats(), served.scrape()
    prompt, params = REFUSED[case]
    start = time.monotonic()
    if stream:
        code = code_of(lambda: list(client.generate_stream(prompt, **params)))
    else:
        code = code_of(lambda: client.generate(prompt, **params))
    elapsed = time.monotonic() - start
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert elapsed < 5.0  # generous: a 1 MiB prompt is tokenized before the length check
    assert queued == [], "an invalid request got a handle"
    after = engine.stats()
    assert (after.queue_depth, after.running, after.kv_blocks_used, after.steps) == (0, 0, 0, before.steps)
    s = served.scrape()
    for name in ("loraplex_prompt_tokens_total", "loraplex_time_to_first_token_seconds_count"):
        assert s[(name, ())] == scraped[(name, ())]


def test_a_message_over_the_grpc_limit_is_refused_and_the_server_goes_on(served, client):
    # 5 MiB is over gRPC's default 4 MiB receive limit: refused by the transport.
    assert code_of(lambda: client.generate("w" * (5 << 20), max_new_tokens=2)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.generate(PROMPT, max_new_tokens=2, ignore_eos=True).generated_tokens == 2


# -- more adapters than slots ----------------------------------------------------------------------
def rss_mib() -> float:
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("needs /proc for the resident set size")
    return int(re.search(r"VmRSS:\s+(\d+)", status.read_text()).group(1)) / 1024


def live_adapter_weights() -> int:
    from loraplex.adapters.form import AdapterWeights

    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is AdapterWeights)


@pytest.fixture(scope="module")
def peft_dirs(tmp_path_factory) -> dict[str, Path]:
    from peft_adapters import save_peft_adapter  # tests/support, on sys.path via tests/conftest.py

    root = tmp_path_factory.mktemp("peft-for-eviction")
    for adapter_id, (kind, seed) in EVICTION_ADAPTERS.items():
        save_peft_adapter(kind, root / adapter_id, seed=seed, strength=4.0)
    return {adapter_id: root / adapter_id for adapter_id in EVICTION_ADAPTERS}


def test_more_adapters_than_slots_are_evicted_lru_and_served_right(served, client, admin, peft_dirs):
    engine = served.engine
    served.wait_idle()
    base = engine.stats()
    weights_before, rss_before = live_adapter_weights(), rss_mib()
    params = dict(max_new_tokens=12, ignore_eos=True)
    ids = list(peft_dirs)
    for adapter_id, path in peft_dirs.items():
        admin.upload_adapter(adapter_id, path)
    try:
        # Each adapter alone: its reference output. Six adapters through two slots.
        solo = {a: client.generate(PROMPT, a, **params).token_ids for a in ids}
        solo[""] = client.generate(PROMPT, "", **params).token_ids
        assert len(set(solo.values())) == len(solo), "adapters must change the output, or mistakes hide"
        assert engine.stats().adapter_evictions - base.adapter_evictions >= len(ids) - SLOTS

        # All at once, twice over, streamed and unary: each still gets its solo output.
        peak = {"resident": 0, "pins": 0}
        sampling = threading.Event()

        def sample():
            while not sampling.wait(0.005):
                s = engine.stats()
                peak["resident"] = max(peak["resident"], s.adapters_resident)
                peak["pins"] = max(peak["pins"], s.adapter_pins)

        results, errors = {}, []

        def call(adapter_id, round_):
            try:
                if round_ % 2:
                    results[(adapter_id, round_)] = tuple(t for c in client.generate_stream(PROMPT, adapter_id, **params) for t in c.token_ids)
                else:
                    results[(adapter_id, round_)] = client.generate(PROMPT, adapter_id, **params).token_ids
            except Exception as e:  # noqa: BLE001 — reported below
                errors.append((adapter_id, e))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            for round_ in range(2):  # ≤ MAX_RUNNING + MAX_QUEUE in flight: no RESOURCE_EXHAUSTED
                threads = [threading.Thread(target=call, args=(a, round_)) for a in [*ids, ""]]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(60)
        finally:
            sampling.set()
            sampler.join(5)
        assert not errors, errors
        for (adapter_id, _), tokens in results.items():
            assert tokens == solo[adapter_id], adapter_id
        assert len(results) == 2 * (len(ids) + 1)
        assert 0 < peak["resident"] <= SLOTS and peak["pins"] <= MAX_RUNNING
        assert engine.stats().adapter_load_failures == base.adapter_load_failures
    finally:
        for adapter_id in ids:
            admin.unload_adapter(adapter_id, delete_files=True)

    # Nothing left behind: slots, pins, converted weights, and (generously) memory.
    served.wait_for(lambda: engine.stats().adapters_resident == 0, 10, "no resident adapters")
    served.wait_idle()
    s = served.scrape()
    assert s[("loraplex_adapters_resident", ())] == 0
    assert s[("loraplex_adapters_known", ())] == base.adapters_known
    assert engine.stats().adapter_pins == 0
    assert live_adapter_weights() <= weights_before
    assert rss_mib() - rss_before < 64, "process memory did not come back near its baseline"


def test_an_adapter_unloaded_while_its_request_waits(served, client, admin, peft_dirs, monkeypatch):
    """A request queued for an adapter that is unloaded before it is admitted must be
    answered (NOT_FOUND, or served by the old weights), and the requests running beside
    it must not fail."""
    engine = served.engine
    served.wait_idle()
    handles = []
    submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda r: handles.append(submit(r)) or handles[-1])
    admin.upload_adapter("doomed", peft_dirs["lora-a"])
    unloaded, streams = False, []
    try:
        # A short and a long request fill the running batch; the one for "doomed" waits
        # and is admitted when the short one ends, beside the long one.
        short = client.generate_stream(PROMPT, max_new_tokens=60, ignore_eos=True, timeout=60)
        long = client.generate_stream(PROMPT, max_new_tokens=400, ignore_eos=True, timeout=60)
        streams += [short, long]
        served.wait_for(lambda: engine.stats().running == MAX_RUNNING, 20, "a full running batch")
        waiting = client.generate_stream(PROMPT, "doomed", max_new_tokens=4, ignore_eos=True, timeout=4)
        streams.append(waiting)
        served.wait_for(lambda: engine.stats().queue_depth == 1, 10, "the request queued")
        admin.unload_adapter("doomed", delete_files=True)
        unloaded = True
        codes = {name: code_of(lambda s=s: list(s)) for name, s in (("waiting", waiting), ("short", short), ("long", long))}
        assert codes["waiting"] in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND), codes
        assert codes["short"] == grpc.StatusCode.OK and codes["long"] == grpc.StatusCode.OK, codes
    finally:
        for stream in streams:
            stream.cancel()
        rescue_unanswered(handles)
        if not unloaded:
            admin.unload_adapter("doomed", delete_files=True)
    served.wait_idle()


def rescue_unanswered(handles, timeout: float = 2.0) -> None:
    """Ends handles the engine lost (a regression of the bug the test above guards
    against), so that their gRPC handler threads return and the session can exit."""
    from loraplex.server.engine.request import FINISH_CANCELLED, FinishEvent

    deadline = time.monotonic() + timeout
    while any(h.finished is None for h in handles) and time.monotonic() < deadline:
        time.sleep(0.01)
    for h in handles:
        if h.finished is None:
            h._emit(FinishEvent(FINISH_CANCELLED, (), "", 0))


# -- SIGTERM with streams in flight -------------------------------------------------------------------
class ServeProcess:
    """`loraplex serve` as a child process (its own cwd: `python -m` puts the cwd on sys.path)."""

    def __init__(self, tmp: Path, *extra: str):
        root = tmp / "adapters"
        env = dict(os.environ, LORAPLEX_ADMIN_TOKEN=ADMIN_TOKEN, XDG_DATA_HOME=str(tmp / "xdg"))
        self.log = tmp / "serve.log"
        cmd = [sys.executable, "-m", "loraplex.server.cli", "serve", "--port", "0", "--metrics-port", "0",
               "--adapter-root", str(root), "--no-demo-adapters", "--device", "cpu", "--max-rank", "8", "--kv-cache-tokens", "4096",
               "--max-batch-tokens", "256", "--max-new-tokens", "1000", *extra]  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=self.log.open("w"), text=True)
        self.target = self.metrics_url = None
        deadline = time.monotonic() + 120
        for line in self.proc.stdout:  # ends when the process does
            if m := re.search(r"metrics: (http://\S+/metrics)", line):
                self.metrics_url = m.group(1)
            if m := re.search(r"serving on (\S+)", line):
                self.target = m.group(1)
                break
            assert time.monotonic() < deadline
        assert self.target, f"no 'serving on' line; log:\n{self.log.read_text()[-3000:]}"

    def arrived(self) -> float:
        """Generation requests that reached the servicer so far (loraplex_adapter_requests)."""
        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        return sum(float(v) for v in re.findall(r"^loraplex_adapter_requests_total\{[^}]*\} (\S+)$", text, re.M))

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def processes():
    started: list[ServeProcess] = []
    yield started
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(10)


def test_sigterm_drains_many_streams_and_cancels_what_outlives_the_grace(tmp_path, processes, peft_dirs):
    # The long stream's 968 tokens take ~2.1 s on a 2-core CI machine (2.2 ms a token,
    # one stream on the tiny model); the short ones ~20 ms each: a 1 s grace ends in
    # between, with room both ways (at 3 s the long one could finish in time).
    grace = 1.0
    p = ServeProcess(tmp_path, "--max-running", "3", "--max-queue", "8", "--shutdown-grace", str(grace))
    processes.append(p)
    with LoraplexClient(p.target, admin_token=ADMIN_TOKEN, timeout=60) as client:
        client.upload_adapter("kept", peft_dirs["lora-b"])
        short = dict(max_new_tokens=8, ignore_eos=True)
        expected = {a: client.generate(PROMPT, a, **short).token_ids for a in ("", "kept")}
        # Running: one stream that cannot finish within the grace, two short ones;
        # queued behind them: two more short ones (max-running 3).
        endless = client.generate_stream(PROMPT, max_new_tokens=1000 - 32, ignore_eos=True)
        first = iter(endless)
        assert next(first).token_ids
        shorts = [client.generate_stream(PROMPT, a, **short) for a in ("", "kept", "kept", "")]
        deadline = time.monotonic() + 10
        while p.arrived() < 2 + 1 + len(shorts):  # all in the engine before the signal
            assert time.monotonic() < deadline, "the streams did not reach the server"
            time.sleep(0.005)
        time.sleep(0.05)  # counted just before engine.submit
        results, errors = {}, []

        def read(i, stream):
            try:
                results[i] = [c for c in stream]
            except grpc.RpcError as e:
                errors.append((i, e.code()))

        readers = [threading.Thread(target=read, args=(i, s)) for i, s in enumerate(shorts)]
        for t in readers:
            t.start()
        signalled = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        deadline = signalled + 10
        while client.health() != "NOT_SERVING":
            assert time.monotonic() < deadline, "health never turned NOT_SERVING"
            time.sleep(0.02)
        assert code_of(lambda: client.generate(PROMPT, max_new_tokens=2)) == grpc.StatusCode.UNAVAILABLE
        assert code_of(lambda: list(client.generate_stream(PROMPT, "kept", max_new_tokens=2))) == grpc.StatusCode.UNAVAILABLE
        for t in readers:
            t.join(grace + 30)
        assert not errors, errors
        for i, adapter_id in enumerate(("", "kept", "kept", "")):  # in flight or queued: finished in full
            chunks = results[i]
            assert chunks[-1].finish_reason == "length"
            assert tuple(t for c in chunks for t in c.token_ids) == expected[adapter_id]
        # The one that outlives the grace is cancelled by the server: UNAVAILABLE, not a hang.
        assert code_of(lambda: list(first)) == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - signalled < grace + 10
    assert p.wait_exit(grace + 20) == 0
    assert time.monotonic() - signalled < grace + 25
