"""A mixture over gRPC (`adapters` in GenerateRequest): the engine's output for the same
mixture, INVALID_ARGUMENT beside adapter_id, NOT_FOUND for an unknown part, and one
`_mixture` series in the per-adapter metrics whatever the parts."""

from __future__ import annotations

import urllib.request

import grpc
import pytest

from loraplex.server.engine.request import GenerationRequest, SamplingParams
from loraplex.v1 import generate_pb2, generate_pb2_grpc

MIXTURE = (("alpha", 0.5), ("beta", -1.5))  # exact in float32, as the wire carries them


def _mixture_requests(running) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(running.metrics_url, timeout=10).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "loraplex_adapter_requests_total" and s.labels.get("adapter") == "_mixture")  # fmt: skip


def _request(ids, adapters, **fields):
    parts = [generate_pb2.AdapterWeight(adapter_id=i, weight=w) for i, w in adapters]
    params = generate_pb2.SamplingParameters(max_new_tokens=10, ignore_eos=True)
    return generate_pb2.GenerateRequest(token_ids=generate_pb2.TokenIds(ids=ids), adapters=parts, params=params, **fields)


def test_mixture_over_grpc(running):
    engine = running.engine
    ids = engine.tokenizer.encode("the teacher finds")
    want = engine.generate(GenerationRequest(ids, SamplingParams(max_new_tokens=10, ignore_eos=True), adapters=MIXTURE), 30)
    before = _mixture_requests(running)
    with grpc.insecure_channel(running.target) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)
        got = stub.Generate(_request(ids, MIXTURE), timeout=30)
        assert list(got.token_ids) == list(want.token_ids) and got.text == want.text
    from loraplex.client import LoraplexClient

    with LoraplexClient(running.target, timeout=30) as client:  # the Python client's adapters={id: weight}
        assert list(client.generate(ids, adapters=dict(MIXTURE), max_new_tokens=10, ignore_eos=True).token_ids) == list(want.token_ids)
    with grpc.insecure_channel(running.target) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(_request(ids, MIXTURE, adapter_id="alpha"), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "adapter_id and adapters are exclusive" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(_request(ids, (("alpha", 1.0), ("no-such", 1.0))), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "no-such" in e.value.details()
    assert _mixture_requests(running) - before == 3  # the NOT_FOUND one is counted too, as for single adapters
    running.wait_idle()
