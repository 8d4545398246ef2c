"""10,000 generation requests for adapter ids nobody registered create no new metric
series: unknown ids are counted under one label ("_unknown"), malformed ones under none,
and both are refused before the engine's queue (NOT_FOUND, INVALID_ARGUMENT)."""

from __future__ import annotations

import random
import string
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc

from loraplex.v1 import generate_pb2, generate_pb2_grpc

CALLS, WORKERS, WINDOW = 10_000, 4, 8  # each worker keeps WINDOW calls in flight (32 < the server's 56)


def random_ids(rng: random.Random, n: int) -> list[str]:
    """Ids no adapter has: mostly well-formed (NOT_FOUND), some malformed (INVALID_ARGUMENT)."""
    alphabet = string.ascii_letters + string.digits + "._-"
    ids = []
    for i in range(n):
        if i % 10 == 9:
            ids.append(rng.choice(["../", "/", " ", "é", "\x00", "x" * 200]) + rng.choice(alphabet))
        else:
            tail = "".join(rng.choices(alphabet, k=rng.randint(1, 40)))
            while ".." in tail:
                tail = tail.replace("..", "._")
            ids.append(f"u{i}-{tail}")
    return ids


def test_unknown_adapter_ids_create_no_series(hardened, kit):
    rng = random.Random(6)
    ids = random_ids(rng, CALLS)
    assert not set(ids) & {a.adapter_id for a in hardened.engine.adapters.list()}
    before = hardened.scrape()
    steps_before = hardened.engine.stats().steps
    codes: Counter = Counter()
    lock = threading.Lock()

    def worker(share: list[str]) -> None:
        with grpc.insecure_channel(hardened.target) as channel:
            generate = generate_pb2_grpc.GenerationStub(channel).Generate
            params = generate_pb2.SamplingParameters(max_new_tokens=4)
            for start in range(0, len(share), WINDOW):
                futures = [generate.future(generate_pb2.GenerateRequest(adapter_id=a, text=kit.PROMPT, params=params), timeout=60)
                           for a in share[start : start + WINDOW]]  # fmt: skip
                local = Counter(f.code() for f in futures)
                with lock:
                    codes.update(local)

    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(worker, [ids[i::WORKERS] for i in range(WORKERS)]))

    assert codes == {grpc.StatusCode.NOT_FOUND: CALLS * 9 // 10, grpc.StatusCode.INVALID_ARGUMENT: CALLS // 10}, codes
    after = hardened.scrape()
    new = set(after) - set(before)
    allowed = {  # at most these may be new (if no test counted them before)
        ("loraplex_requests", (("code", "NOT_FOUND"), ("frontend", "grpc"), ("method", "Generate"))),
        ("loraplex_requests", (("code", "INVALID_ARGUMENT"), ("frontend", "grpc"), ("method", "Generate"))),
        ("loraplex_adapter_requests", (("adapter", "_unknown"),)),
    }
    new_series = {(name.removesuffix("_created").removesuffix("_total"), labels) for name, labels in new}
    assert new_series <= allowed, sorted(new_series - allowed)[:10]
    delta = lambda key: after[key] - before.get(key, 0.0)  # noqa: E731
    assert delta(("loraplex_adapter_requests_total", (("adapter", "_unknown"),))) == CALLS * 9 // 10
    labels = {value for _, series_labels in after for _, value in series_labels}
    assert not labels & set(ids)
    assert hardened.engine.stats().steps == steps_before  # nothing reached the engine
    assert hardened.engine.stats().queue_depth == 0
