"""The OpenAI-compatible HTTP API through the real `openai` package (and raw HTTP for
the wire details) against a live server that also serves gRPC on the same engine."""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import socket
from urllib.parse import urlparse

import openai
import pytest

from loraplex.client import LoraplexClient

PROMPT = "Once upon a time"
GREEDY = dict(temperature=0, max_tokens=12)
ADMIN = "http-admin-token"  # conftest's ADMIN_TOKEN


def test_models_lists_the_base_and_every_adapter(openai_client, http_live):
    models = {m.id: m for m in openai_client.models.list().data}
    assert set(models) == {"tiny-llama", "shout", "pirate"}
    assert models["shout"].model_extra["parent"] == "tiny-llama" and models["tiny-llama"].model_extra["parent"] is None


@pytest.mark.parametrize("model", ["shout", "tiny-llama:shout"])
def test_completions_match_grpc_generate_token_for_token(openai_client, http_live, model):
    with LoraplexClient(http_live.target, timeout=60) as grpc_client:
        want = grpc_client.generate(PROMPT, "shout", max_new_tokens=12, temperature=0.0)
        base = grpc_client.generate(PROMPT, "", max_new_tokens=12, temperature=0.0)
    got = openai_client.completions.create(model=model, prompt=PROMPT, extra_body={"return_token_ids": True}, **GREEDY)
    assert got.object == "text_completion" and got.id.startswith("cmpl-") and got.model == model and got.created > 0
    choice = got.choices[0]
    assert choice.model_extra["token_ids"] == list(want.token_ids) and choice.text == want.text
    assert choice.finish_reason == want.finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.prompt_tokens, 12)
    assert want.token_ids != base.token_ids  # the adapter was applied, not the base
    by_ids = openai_client.completions.create(model=model, prompt=http_live.engine.tokenizer.encode(PROMPT), **GREEDY)
    assert by_ids.choices[0].text == want.text

    chunks = list(openai_client.completions.create(model=model, prompt=PROMPT, stream=True, stream_options={"include_usage": True},
                                                   extra_body={"return_token_ids": True}, **GREEDY))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert [t for c in chunks if c.choices for t in c.choices[0].model_extra.get("token_ids", [])] == list(want.token_ids)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1


def test_chat_streamed_and_not(openai_client, http_live):
    messages = [{"role": "system", "content": "be loud"}, {"role": "user", "content": "the cat"}]
    ids = http_live.engine.tokenizer.encode_chat(messages)
    with LoraplexClient(http_live.target, timeout=60) as grpc_client:
        want = grpc_client.generate(ids, "shout", max_new_tokens=10, temperature=0.0)
    got = openai_client.chat.completions.create(model="shout", messages=messages, temperature=0, max_completion_tokens=10,
                                                extra_body={"return_token_ids": True})  # fmt: skip
    assert got.object == "chat.completion" and got.id.startswith("chatcmpl-")
    assert got.choices[0].message.role == "assistant" and got.usage.prompt_tokens == len(ids)
    assert got.choices[0].finish_reason in ("length", "stop")
    assert got.choices[0].model_extra["token_ids"] == list(want.token_ids)
    completion = openai_client.completions.create(model="shout", prompt=ids, temperature=0, max_tokens=10)
    assert got.choices[0].message.content == completion.choices[0].text  # the same prompt ids, rendered by the template

    stream = openai_client.chat.completions.create(model="shout", messages=messages, temperature=0, max_tokens=10, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == got.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == got.choices[0].finish_reason and chunks[-1].usage is None


def test_sse_wire_format_ends_with_done(http_live):
    u = urlparse(http_live.base_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"model": "pirate", "prompt": PROMPT, "max_tokens": 3, "stream": True,
                                                        "ignore_eos": True}), {"Content-Type": "application/json"})  # fmt: skip
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def _shape(body) -> dict:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"], body
    return body["error"]


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/completions", {"prompt": PROMPT, "temperature": -1}, None),
        ("/completions", {"prompt": PROMPT, "n": 2}, "n"),
        ("/completions", {"prompt": PROMPT, "logprobs": 1}, "logprobs"),
        ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
        ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ("/completions", {"prompt": PROMPT, "presence_penalty": 0.5}, "presence_penalty"),
        ("/completions", {"prompt": PROMPT, "stop": ["x"] * 17}, None),
        ("/completions", {"prompt": PROMPT, "max_tokens": 100_000}, None),
        ("/completions", {"prompt": [1] * 9000}, None),  # longer than the context
        ("/completions", {"prompt": [1, 10**9]}, None),  # not a token id
        ("/completions", {"prompt": ""}, None),
        ("/completions", {"prompt": PROMPT, "stream_options": {"include_usage": True}}, "stream_options"),
        ("/chat/completions", {"messages": []}, "messages"),
        ("/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ],
)
def test_bad_parameters_are_400_naming_the_field(http_live, path, body, param):
    steps = http_live.engine.stats().steps
    status, answer = http_live.post(path, {"model": "shout", **body})
    error = _shape(answer)
    assert status == 400 and error["type"] == "invalid_request_error", answer
    if param is not None:
        assert error["param"] == param and param.split(".")[0] in error["message"], answer
    assert http_live.engine.stats().steps == steps  # nothing reached the engine


def test_malformed_json_is_400(http_live):
    status, answer = http_live.post("/completions", b"{not json")
    assert status == 400 and _shape(answer)["type"] == "invalid_request_error"


@pytest.mark.parametrize("model", ["no-such-adapter", "tiny-llama:no-such", "other-base:shout", "", "../shout", "x" * 300])
def test_unknown_models_are_404_and_never_answered(openai_client, http_live, model):
    steps = http_live.engine.stats().steps
    for call in (
        lambda: openai_client.completions.create(model=model, prompt=PROMPT, max_tokens=2),
        lambda: openai_client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=2),
        lambda: list(openai_client.completions.create(model=model, prompt=PROMPT, max_tokens=2, stream=True)),
    ):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        error = _shape(e.value.response.json())
        assert error["code"] == "model_not_found" and error["param"] == "model"
    assert http_live.engine.stats().steps == steps


def test_chat_without_a_template_is_400(http_live, monkeypatch):
    monkeypatch.setattr(http_live.engine.tokenizer, "chat_template", None)
    status, answer = http_live.post("/chat/completions", {"model": "shout", "messages": [{"role": "user", "content": "x"}]})
    assert status == 400 and "chat template" in _shape(answer)["message"]


def test_tokens_401_and_not_ready_503(front_end, http_live):
    guarded = front_end(api_tokens=("client-token",))
    url = guarded.http_url + "/v1"
    body = {"model": "shout", "prompt": PROMPT, "max_tokens": 2}
    for token in (None, "wrong", "Basic abc"):
        status, answer = http_live.post("/completions", body, token=token, url=url)
        assert status == 401 and _shape(answer)["type"] == "authentication_error"
    assert http_live.get("/models", url=url)[0] == 401
    assert http_live.post("/completions", body, token="client-token", url=url)[0] == 200
    assert http_live.post("/completions", body, token=ADMIN, url=url)[0] == 200  # the admin token generates too
    assert http_live.post("/load_lora_adapter", {"lora_name": "x", "lora_path": "shout"}, token="client-token", url=url)[0] == 403

    warming = front_end(ready=False)
    url = warming.http_url + "/v1"
    status, answer = http_live.post("/completions", body, url=url)
    assert status == 503 and _shape(answer)["type"] == "service_unavailable"
    assert http_live.get("/health", url=warming.http_url)[0] == 503
    assert http_live.get("/health", url=guarded.http_url)[0] == 200


def test_queue_full_is_429(http_live, monkeypatch):
    engine = http_live.engine
    monkeypatch.setattr(engine, "config", dataclasses.replace(engine.config, max_queue=1))
    streams = []
    try:
        for i in range(9):  # 8 running, 1 waiting
            streams.append(_open_stream(http_live, max_tokens=500))
            http_live.wait_for(lambda: engine.stats().running + engine.stats().queue_depth == i + 1 and
                               engine.stats().queue_depth == (i == 8), 20, f"request {i} admitted")  # fmt: skip
        http_live.wait_for(lambda: engine.stats().queue_depth == 1 and engine.stats().running == 8, 20, "a full queue")
        status, answer = http_live.post("/completions", {"model": "shout", "prompt": PROMPT, "max_tokens": 2})
        assert status == 429 and _shape(answer)["type"] == "rate_limit_error"
    finally:
        for conn, _ in streams:
            conn.close()
    http_live.wait_idle()


def _open_stream(http_live, max_tokens: int, model: str = "shout"):
    u = urlparse(http_live.base_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "stream": True,
                                                        "ignore_eos": True}), {"Content-Type": "application/json"})  # fmt: skip
    r = conn.getresponse()
    assert r.status == 200
    return conn, r


def test_disconnect_mid_stream_frees_everything(http_live):
    conn, r = _open_stream(http_live, max_tokens=500)
    assert r.readline().startswith(b"data: ")  # tokens are flowing
    assert http_live.engine.stats().running == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    http_live.wait_idle(10)
    scraped = http_live.scrape()
    for gauge in ("loraplex_running_requests", "loraplex_queue_depth", "loraplex_kv_blocks_used"):
        assert scraped[(gauge, ())] == 0, gauge


def test_a_client_leaving_before_a_whole_answer_cancels_it(http_live):
    from loraplex.server.engine.request import FINISH_CANCELLED

    finished = []
    submit = http_live.engine.submit

    def recording(request):
        handle = submit(request)
        finished.append(handle)
        return handle

    http_live.engine.submit = recording
    try:
        u = urlparse(http_live.base_url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"model": "shout", "prompt": PROMPT, "max_tokens": 400,
                                                            "ignore_eos": True}), {"Content-Type": "application/json"})  # fmt: skip
        http_live.wait_for(lambda: http_live.engine.stats().running == 1, 10, "the request running")
        conn.sock.shutdown(socket.SHUT_RDWR)  # gone before the (non-streamed) answer
        conn.close()
        http_live.wait_idle(10)
    finally:
        del http_live.engine.submit
    (handle,) = finished
    assert handle.finished.finish_reason == FINISH_CANCELLED and handle.finished.generated_tokens < 400


def test_fifty_concurrent_streams_all_finish(http_live):
    async def run():
        async with openai.AsyncOpenAI(base_url=http_live.base_url, api_key="x", max_retries=0, timeout=120) as c:
            async def one(i):
                stream = await c.completions.create(model=("shout", "pirate", "tiny-llama")[i % 3], prompt=f"{PROMPT} {i}",
                                                    max_tokens=6, stream=True, extra_body={"ignore_eos": True})  # fmt: skip
                chunks = [chunk async for chunk in stream]
                return chunks[-1].choices[0].finish_reason, sum(1 for ch in chunks if ch.choices[0].text or ch.choices[0].finish_reason is None)

            return await asyncio.gather(*(one(i) for i in range(50)))

    results = asyncio.run(run())
    assert len(results) == 50 and all(reason == "length" for reason, _ in results)
    http_live.wait_idle()


def test_vllm_style_load_and_unload(http_live, openai_client):
    load = {"lora_name": "loud", "lora_path": "shout"}
    for token, status in ((None, 401), ("not-the-admin-token", 403)):
        code, answer = http_live.post("/load_lora_adapter", load, token=token)
        assert code == status, answer
        _shape(answer)
        assert http_live.post("/unload_lora_adapter", {"lora_name": "shout"}, token=token)[0] == status
    assert "loud" not in http_live.engine.adapters and "shout" in http_live.engine.adapters

    assert http_live.post("/load_lora_adapter", {"lora_name": "x", "lora_path": "/etc"}, token=ADMIN)[0] == 400  # outside the root
    code, answer = http_live.post("/load_lora_adapter", load, token=ADMIN)
    assert code == 200, answer
    try:
        assert http_live.post("/load_lora_adapter", load, token=ADMIN)[0] == 409
        assert "loud" in {m.id for m in openai_client.models.list().data}
        same = [openai_client.completions.create(model=m, prompt=PROMPT, **GREEDY).choices[0].text for m in ("loud", "shout")]
        assert same[0] == same[1]
    finally:
        code, answer = http_live.post("/unload_lora_adapter", {"lora_name": "loud"}, token=ADMIN)
    assert code == 200, answer
    assert http_live.post("/unload_lora_adapter", {"lora_name": "loud"}, token=ADMIN)[0] == 404
    with pytest.raises(openai.NotFoundError):
        openai_client.completions.create(model="loud", prompt=PROMPT, max_tokens=2)
    assert (http_live.adapter_root / "shout" / "adapter_config.json").is_file()  # unload keeps the files


def test_http_requests_are_counted_with_their_frontend(http_live, openai_client):
    before = http_live.scrape()
    openai_client.completions.create(model="shout", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        openai_client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    after = http_live.scrape()

    def delta(**labels):
        key = ("loraplex_requests_total", tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta(frontend="http", method="completions", code="200") == 1
    assert delta(frontend="http", method="completions", code="404") == 1
    assert after[("loraplex_time_to_first_token_seconds_count", ())] - before[("loraplex_time_to_first_token_seconds_count", ())] == 1
