"""A mixture over HTTP (the `adapters` extension field, with `model` the base): the
engine's output for the same mixture; with `model` naming an adapter it is a 400 that
names the field, and refused mixtures are 400s that say why."""

from __future__ import annotations

from loraplex.server.engine.request import GenerationRequest, SamplingParams

MIXTURE = (("shout", 0.75),)  # the other bundled adapter, pirate, is DoRA


def test_mixture_over_http(http_live):
    engine = http_live.engine
    ids = engine.tokenizer.encode("the teacher finds")
    want = engine.generate(GenerationRequest(ids, SamplingParams(max_new_tokens=8), adapters=MIXTURE), 30)
    body = {"model": "tiny-llama", "prompt": ids, "max_tokens": 8, "temperature": 0, "return_token_ids": True,
            "adapters": [{"adapter_id": i, "weight": w} for i, w in MIXTURE]}  # fmt: skip
    status, answer = http_live.post("/completions", body)
    assert status == 200, answer
    choice = answer["choices"][0]
    assert choice["token_ids"] == list(want.token_ids) and choice["text"] == want.text
    status, answer = http_live.post("/completions", dict(body, model="shout"))
    assert status == 400 and answer["error"]["param"] == "adapters"
    assert "adapters (a mixture) and a model naming an adapter ('shout') are exclusive" in answer["error"]["message"]
    status, answer = http_live.post("/completions", dict(body, adapters=[{"adapter_id": "shout", "weight": 1}] * 2))
    assert status == 400 and "adapter 'shout' appears twice in the mixture" in answer["error"]["message"]
    status, answer = http_live.post("/completions", dict(body, adapters=[{"adapter_id": "pirate", "weight": 1}]))
    assert status == 400 and "adapter 'pirate' is DoRA, which cannot be mixed" in answer["error"]["message"]
