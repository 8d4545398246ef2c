"""A storm of 1,000 Generate calls that end early, through a real server on loopback
(CPU, the bundled tiny model): streams cancelled after their first token, unary calls
with a tiny deadline, streams with a short deadline, over three adapters sharing two
device slots. Afterwards every request the engine took has finished, the KV blocks,
running requests, queue and adapter pins are back at zero (engine stats and /metrics),
and later requests get exactly the tokens they got before the storm.

The fixture lives here, not in a conftest: this module's server is its own.
"""

from __future__ import annotations

import random
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import pytest

import loraplex
from loraplex.client import LoraplexClient

TINY = Path(loraplex.__file__).parent / "assets" / "tiny-llama"
ADMIN_TOKEN = "storm-admin-token"
PROMPTS = ("Once upon a time", "the teacher finds a")
ADAPTERS = ("", "s1", "s2", "s3")  # "" = base model; three adapters, two device slots
CALLS, THREADS = 1000, 8
MAX_NEW = 200  # far more than any call lives for: every one ends mid-generation
STREAM_CANCELLED, UNARY_DEADLINE, STREAM_DEADLINE = range(3)
EXPECTED = {STREAM_CANCELLED: {"CANCELLED"}, UNARY_DEADLINE: {"DEADLINE_EXCEEDED"}, STREAM_DEADLINE: {"DEADLINE_EXCEEDED"}}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from peft_adapters import save_peft_adapter  # tests/support, on sys.path via tests/conftest.py

    from loraplex.server.app import LoraplexServer, ServeConfig
    from loraplex.server.engine.config import EngineConfig

    root = tmp_path_factory.mktemp("storm-root")
    for i, adapter_id in enumerate(ADAPTERS[1:]):
        save_peft_adapter("lora", root / adapter_id, seed=40 + i, strength=4.0)
    engine = EngineConfig(
        model_dir=TINY, adapter_root=root, quantize="nf4", device="cpu", max_batch_tokens=512, max_running=8,
        max_queue=4 * THREADS, kv_cache_tokens=4096, adapter_slots=2, max_rank=16, max_new_tokens=MAX_NEW,
    )  # fmt: skip
    server = LoraplexServer(ServeConfig(engine=engine, port=0, metrics_port=0, admin_token=ADMIN_TOKEN))
    server.start()
    try:
        server.warm_up()
        yield server
    finally:
        server.stop(2.0)


def gauges(server) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def at_rest(stats) -> bool:
    return stats.running == 0 and stats.queue_depth == 0 and stats.kv_blocks_used == 0 and stats.adapter_pins == 0


def outputs(client) -> dict[tuple[str, str], tuple[int, ...]]:
    return {(a, p): client.generate(p, a, max_new_tokens=16, ignore_eos=True).token_ids for a in ADAPTERS for p in PROMPTS}


def one_call(client: LoraplexClient, kind: int, rng: random.Random) -> tuple[str, int]:
    """One call that ends early; (its status code name, tokens received)."""
    prompt, adapter = rng.choice(PROMPTS), rng.choice(ADAPTERS)
    received = 0
    try:
        if kind == STREAM_CANCELLED:
            stream = client.generate_stream(prompt, adapter, max_new_tokens=MAX_NEW, ignore_eos=True, timeout=30)
            chunks = iter(stream)
            for chunk in chunks:
                received += len(chunk.token_ids)
                if received:
                    break
            stream.cancel()
            for chunk in chunks:  # raises CANCELLED
                received += len(chunk.token_ids)
        elif kind == UNARY_DEADLINE:
            client.generate(prompt, adapter, max_new_tokens=MAX_NEW, ignore_eos=True, timeout=rng.uniform(0.005, 0.06))
        else:
            for chunk in client.generate_stream(prompt, adapter, max_new_tokens=MAX_NEW, ignore_eos=True, timeout=rng.uniform(0.05, 0.25)):
                received += len(chunk.token_ids)
    except grpc.RpcError as e:
        return e.code().name, received
    return "OK", received


def test_cancel_storm_leaves_nothing_behind(served, monkeypatch):
    engine = served.engine
    handles = []
    submit = engine.submit

    def spy(request):
        handle = submit(request)
        handles.append(handle)
        return handle

    with LoraplexClient(served.target, timeout=30) as client:
        before = outputs(client)
        assert len(set(before.values())) == len(before), "adapters must change the output, or mistakes hide"
        base = engine.stats()
        assert at_rest(base)

        monkeypatch.setattr(engine, "submit", spy)  # every handle the engine gives out
        codes: Counter = Counter()
        mid_stream = Counter()  # calls that had tokens when they ended
        lock = threading.Lock()
        next_call = iter(range(CALLS))
        storm_deadline = time.monotonic() + 120  # a bound, not a benchmark: stops the loops

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            with LoraplexClient(served.target, timeout=30) as own:  # a channel per thread
                while time.monotonic() < storm_deadline:
                    with lock:
                        i = next(next_call, None)
                    if i is None:
                        return
                    kind = i % 3
                    code, received = one_call(own, kind, rng)
                    with lock:
                        codes[(kind, code)] += 1
                        mid_stream[kind] += received > 0

        threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
        assert not any(t.is_alive() for t in threads)

        assert sum(codes.values()) == CALLS, codes
        unexpected = {k: n for k, n in codes.items() if k[1] not in EXPECTED[k[0]] and k[1] != "OK"}
        assert not unexpected, f"calls ended with unexpected codes: {unexpected} (all: {dict(codes)})"
        # OK only if a deadline call finished all its tokens in time; never for a cancelled one
        assert codes[(STREAM_CANCELLED, "OK")] == 0
        assert mid_stream[STREAM_CANCELLED] == codes[(STREAM_CANCELLED, "CANCELLED")]  # each had its first token
        assert mid_stream[STREAM_DEADLINE] > 0, "no stream was cut mid-generation by its deadline"

        # Every request the engine took has ended, and nothing is held any more.
        deadline = time.monotonic() + 15
        while not (all(h.finished is not None for h in handles) and at_rest(engine.stats())):
            assert time.monotonic() < deadline, (engine.stats(), sum(h.finished is None for h in handles))
            time.sleep(0.02)
        engine.blocks.check()
        g = gauges(served)
        for name in ("loraplex_running_requests", "loraplex_queue_depth", "loraplex_kv_blocks_used"):
            assert g[name] == 0, name
        assert g["loraplex_kv_blocks_free"] == engine.stats().kv_blocks_total
        assert engine.stats().adapters_resident <= 2 and engine.stats().adapter_load_failures == base.adapter_load_failures
        reasons = Counter(h.finished.finish_reason for h in handles)
        assert set(reasons) <= {"cancelled", "deadline", "length"}, reasons

        # Later requests: the same tokens as before the storm, alone and all at once.
        assert outputs(client) == before
        together, errors = {}, []

        def again(key):
            try:
                together[key] = client.generate(key[1], key[0], max_new_tokens=16, ignore_eos=True).token_ids
            except Exception as e:  # noqa: BLE001 — reported below
                errors.append(e)

        threads = [threading.Thread(target=again, args=(key,)) for key in before]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors and together == before
