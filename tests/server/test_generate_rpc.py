"""Generate and GenerateStream through a real server: outputs equal the engine's, errors
map to the right status codes, and the end of an RPC frees the request's KV blocks."""

from __future__ import annotations

import threading

import grpc
import pytest

from loraplex.server.engine.request import GenerationRequest, SamplingParams
from loraplex.v1 import generate_pb2, generate_pb2_grpc

PROMPTS = ("Once upon a time", "the teacher finds")


def engine_output(engine, prompt: str, adapter_id: str | None, **params):
    request = GenerationRequest(engine.tokenizer.encode(prompt), SamplingParams(**params), adapter_id=adapter_id)
    return engine.generate(request, timeout=30)


def test_concurrent_adapters_match_engine(running, client):
    cases = [(a, p, s) for a in ("", "alpha", "beta", "gamma") for p, s in zip(PROMPTS, (False, True))]
    params = dict(max_new_tokens=12, ignore_eos=True)
    expected = {(a, p): engine_output(running.engine, p, a or None, **params) for a, p, _ in cases}
    # adapters change the output, so routing mistakes cannot hide
    assert len({expected[(a, PROMPTS[0])].token_ids for a in ("", "alpha", "beta", "gamma")}) == 4

    results, errors = {}, []

    def call(adapter, prompt, stream):
        try:
            if stream:
                chunks = list(client.generate_stream(prompt, adapter, **params))
                assert all(c.finish_reason is None for c in chunks[:-1]) and chunks[-1].finish_reason == "length"
                ids = tuple(t for c in chunks for t in c.token_ids)
                results[(adapter, prompt)] = (ids, "".join(c.text for c in chunks), chunks[-1].generated_tokens)
            else:
                r = client.generate(prompt, adapter, **params)
                assert r.finish_reason == "length" and r.prompt_tokens == len(running.engine.tokenizer.encode(prompt))
                results[(adapter, prompt)] = (r.token_ids, r.text, r.generated_tokens)
        except Exception as e:  # noqa: BLE001 — reported below
            errors.append(e)

    threads = [threading.Thread(target=call, args=case) for case in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for key, finish in expected.items():
        assert results[key] == (finish.token_ids, finish.text, 12), key


def test_sampling_parameters_reach_the_engine(running, client):
    params = dict(max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.9, seed=1234)
    expected = engine_output(running.engine, PROMPTS[0], "beta", **params)
    assert client.generate(PROMPTS[0], "beta", **params).token_ids == expected.token_ids


def test_token_id_prompt_and_stop_string(running, client):
    engine = running.engine
    ids = engine.tokenizer.encode(PROMPTS[1])
    full = client.generate(ids, max_new_tokens=20, ignore_eos=True)
    assert full.token_ids == engine_output(engine, PROMPTS[1], None, max_new_tokens=20, ignore_eos=True).token_ids
    stop = full.text[4:7]
    stopped = client.generate(ids, max_new_tokens=20, stop=[stop], ignore_eos=True)
    assert stopped.finish_reason == "stop" and stop not in stopped.text and full.text.startswith(stopped.text)


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_adapter_is_not_found(client, stream):
    with pytest.raises(grpc.RpcError) as e:
        if stream:
            list(client.generate_stream("hello", "no-such-adapter", max_new_tokens=4))
        else:
            client.generate("hello", "no-such-adapter", max_new_tokens=4)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "no-such-adapter" in e.value.details()


BAD_ARGUMENTS = {
    "negative temperature": dict(temperature=-1.0),
    "top_p zero": dict(top_p=0.0),
    "top_p above one": dict(top_p=1.5),
    "max_new_tokens zero": dict(max_new_tokens=0),
    "max_new_tokens over the cap": dict(max_new_tokens=100_000),
    "empty stop string": dict(stop=[""]),
    "empty prompt": dict(prompt=""),
    "empty token ids": dict(prompt=[]),
    "token id outside the vocabulary": dict(prompt=[5, 100_000]),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS, ids=list(BAD_ARGUMENTS))
def test_bad_arguments_are_refused_before_the_queue(running, client, monkeypatch, case):
    queued = []
    submit = running.engine.submit
    monkeypatch.setattr(running.engine, "submit", lambda r: queued.append(submit(r)) or queued[-1])
    params = dict(BAD_ARGUMENTS[case])
    prompt = params.pop("prompt", "hello")
    with pytest.raises(grpc.RpcError) as e:
        client.generate(prompt, **params)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert queued == []


def test_missing_prompt_is_invalid(running):
    with grpc.insecure_channel(running.target) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(generate_pb2.GenerateRequest(adapter_id="alpha"), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_cancelled_stream_frees_its_blocks(running, client):
    running.wait_idle()
    stream = client.generate_stream(PROMPTS[0], "alpha", max_new_tokens=800, ignore_eos=True)
    chunks = iter(stream)
    next(chunks), next(chunks)
    assert running.engine.stats().kv_blocks_used > 0
    stream.cancel()
    with pytest.raises(grpc.RpcError) as e:
        list(chunks)
    assert e.value.code() == grpc.StatusCode.CANCELLED
    running.wait_idle(5.0)


def test_deadline_ends_the_request_and_frees_its_blocks(running, client):
    running.wait_idle()
    with pytest.raises(grpc.RpcError) as e:
        client.generate(PROMPTS[0], "beta", max_new_tokens=800, ignore_eos=True, timeout=0.3)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    running.wait_idle(5.0)
