"""OpenAI's wire format <-> loraplex objects: pydantic request models, the response
bodies the openai SDK's types expect, and the mapping of one to SamplingParams.

Requests refuse what they do not know (extra fields: 400 naming the field), and name
the fields they know but do not support (`n` other than 1, `logprobs`, `top_logprobs`),
so that no parameter is accepted and ignored. `user` is accepted and ignored, by OpenAI's
convention (it only tags the caller). Extensions, as in vLLM: `top_k`, `ignore_eos`,
`return_token_ids` (the generated ids in each choice, as `token_ids`).

Defaults are OpenAI's: temperature 1, top_p 1; max_tokens 16 for completions, and for
chat as many as the context and the server's cap allow.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from loraplex.server.engine.errors import InvalidRequest
from loraplex.server.engine.request import FINISH_LENGTH, FINISH_STOP, FinishEvent, SamplingParams

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
FINISH_REASONS = {FINISH_LENGTH: "length", FINISH_STOP: "stop"}


class BadParameter(InvalidRequest):
    """A parameter we refuse (400), with the field's name as OpenAI's `param`."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class AdapterWeight(_Strict):
    adapter_id: StrictStr
    weight: StrictFloat | StrictInt


class _Sampling(_Strict):
    model: StrictStr
    temperature: float | None = None
    top_p: float | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_logprobs: StrictInt | None = None
    user: StrictStr | None = None  # accepted and ignored (OpenAI's convention)
    top_k: StrictInt | None = None  # extension: 0 or unset = off
    ignore_eos: bool = False  # extension
    return_token_ids: bool = False  # extension: each choice carries `token_ids`
    adapters: list[AdapterWeight] | None = None  # extension: a mixture Σ weight·ΔW, with `model` the base model

    def check_supported(self) -> None:
        if self.n not in (None, 1):
            raise BadParameter("n", f"n must be 1: one choice per request (got {self.n})")
        if self.top_logprobs is not None:
            raise BadParameter("top_logprobs", "top_logprobs is not supported")
        if self.stream_options is not None and not self.stream:
            raise BadParameter("stream_options", "stream_options is only allowed with stream: true")

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        kwargs = dict(
            max_new_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            stop_strings=stop,
            ignore_eos=self.ignore_eos,
        )
        return SamplingParams(**kwargs)

    def mixture(self, adapter_id: str | None) -> tuple[tuple[str, float], ...]:
        """The `adapters` mixture as (adapter id, weight) parts; `adapter_id`: the adapter
        `model` names (None: the base), exclusive with a mixture."""
        if not self.adapters:
            return ()
        if adapter_id is not None:
            raise BadParameter("adapters", f"adapters (a mixture) and a model naming an adapter ({self.model!r}) are "
                                           "exclusive: with adapters, set model to the base model")  # fmt: skip
        return tuple((a.adapter_id, float(a.weight)) for a in self.adapters)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictInt]
    max_tokens: StrictInt | None = None
    logprobs: StrictInt | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs is not None:
            raise BadParameter("logprobs", "logprobs is not supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise BadParameter("prompt", "prompt is empty")


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]

    def as_dict(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: bool | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs:
            raise BadParameter("logprobs", "logprobs is not supported")
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise BadParameter("max_completion_tokens", "max_tokens and max_completion_tokens disagree")

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class LoadLoraRequest(_Strict):
    lora_name: StrictStr
    lora_path: StrictStr


class UnloadLoraRequest(_Strict):
    lora_name: StrictStr


# -- responses ------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(event: FinishEvent) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.generated_tokens,
            "total_tokens": event.prompt_tokens + event.generated_tokens}  # fmt: skip


def completion(rid: str, created: int, model: str, event: FinishEvent, token_ids: bool) -> dict:
    choice = {"index": 0, "text": event.text, "logprobs": None, "finish_reason": FINISH_REASONS[event.finish_reason]}
    if token_ids:
        choice["token_ids"] = list(event.token_ids)
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice], "usage": usage(event)}


def completion_chunk(rid: str, created: int, model: str, text: str, finish_reason: str | None = None,
                     token_ids: tuple[int, ...] | None = None) -> dict:  # fmt: skip
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = list(token_ids)
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def chat_completion(rid: str, created: int, model: str, event: FinishEvent, token_ids: bool) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": event.text}, "logprobs": None,
              "finish_reason": FINISH_REASONS[event.finish_reason]}  # fmt: skip
    if token_ids:
        choice["token_ids"] = list(event.token_ids)
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": [choice], "usage": usage(event)}


def chat_chunk(rid: str, created: int, model: str, delta: dict, finish_reason: str | None = None,
               token_ids: tuple[int, ...] | None = None) -> dict:  # fmt: skip
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = list(token_ids)
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def usage_chunk(rid: str, created: int, model: str, obj: str, event: FinishEvent) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage(event)}


def model_list(models: list[tuple[str, str | None]], created: int) -> dict:
    return {"object": "list", "data": [{"id": mid, "object": "model", "created": created, "owned_by": "loraplex",
                                        "root": mid, "parent": parent} for mid, parent in models]}  # fmt: skip


def now() -> int:
    return int(time.time())
