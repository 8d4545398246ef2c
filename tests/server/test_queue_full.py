"""A full queue answers RESOURCE_EXHAUSTED at once; bad arguments are still
INVALID_ARGUMENT (checked before the queue); the queue recovers."""

from __future__ import annotations

import time

import grpc
import pytest

from loraplex.server.engine.errors import QueueFull
from loraplex.server.engine.request import GenerationRequest, SamplingParams


def test_queue_full_is_resource_exhausted(running, client):
    engine = running.engine
    cfg = engine.config
    ids = engine.tokenizer.encode("Once upon a time")
    long = SamplingParams(max_new_tokens=800, ignore_eos=True)
    running.wait_idle()
    handles = []
    try:
        # Fill the running batch with long requests; then nothing leaves the queue.
        handles += [engine.submit(GenerationRequest(ids, long)) for _ in range(cfg.max_running)]
        deadline = time.monotonic() + 10
        while engine.stats().running < cfg.max_running:
            assert time.monotonic() < deadline, engine.stats()
            time.sleep(0.005)
        handles += [engine.submit(GenerationRequest(ids, long)) for _ in range(cfg.max_queue)]
        with pytest.raises(QueueFull):
            engine.submit(GenerationRequest(ids, long))

        for call in (lambda: client.generate("hi", max_new_tokens=4), lambda: list(client.generate_stream("hi", "alpha"))):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as e:
            client.generate("hi", temperature=-1.0)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        for h in handles:
            h.cancel()
        for h in handles:
            h.result(timeout=10)
    running.wait_idle()
    assert client.generate("hi", max_new_tokens=2).generated_tokens == 2
