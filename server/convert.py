"""Protobuf <-> loraplex objects. Pure functions: no engine calls, no gRPC context.

Requests: `generation_request_from_pb` turns a GenerateRequest into a GenerationRequest
(tokenizing a text prompt with the tokenizer it is given); anything wrong with the
request raises InvalidRequest here, before the engine's queue sees it: malformed adapter
ids, too many stop strings or stop token ids, temperatures so small that the sampler's
logits / temperature overflow. Whether an id is registered is the engine's question
(NOT_FOUND). Messages never quote more than a short prefix of what the client sent.
Responses: FinishEvent / TokenEvent -> GenerateResponse / GenerateStreamResponse,
AdapterInfo -> loraplex.v1.AdapterInfo.
"""

from __future__ import annotations

from loraplex.adapters.store import ID_PATTERN
from loraplex.server.engine.errors import InvalidRequest
from loraplex.server.engine.request import (
    FINISH_ADAPTER_GONE,
    FINISH_CANCELLED,
    FINISH_DEADLINE,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    FinishEvent,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)
from loraplex.v1 import admin_pb2, generate_pb2

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64  # the engine checks each generated token against all of them
# Sampling divides float32 logits by the temperature. Near float32's smallest values (and
# below, where it rounds to 0) the quotient overflows, softmax gives NaN and the sampler
# raises, failing every request of the step. Anything this small is greedy in all but name.
MIN_TEMPERATURE = 1e-4

_FINISH_TO_PB = {
    FINISH_LENGTH: generate_pb2.FINISH_REASON_LENGTH,
    FINISH_STOP: generate_pb2.FINISH_REASON_STOP,
    FINISH_CANCELLED: generate_pb2.FINISH_REASON_CANCELLED,
    FINISH_DEADLINE: generate_pb2.FINISH_REASON_DEADLINE,
    FINISH_ERROR: generate_pb2.FINISH_REASON_ERROR,
    FINISH_ADAPTER_GONE: generate_pb2.FINISH_REASON_ERROR,  # never sent: the RPC ends NOT_FOUND
}


def sampling_params_from_pb(pb: generate_pb2.SamplingParameters) -> SamplingParams:
    """Unset optional fields take SamplingParams' defaults. InvalidRequest names the field."""
    if len(pb.stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings, got {len(pb.stop)}")
    if any(len(s) > MAX_STOP_STRING_CHARS for s in pb.stop):
        raise InvalidRequest(f"stop strings are at most {MAX_STOP_STRING_CHARS} characters")
    if len(pb.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequest(f"at most {MAX_STOP_TOKEN_IDS} stop token ids, got {len(pb.stop_token_ids)}")
    if 0.0 < pb.temperature < MIN_TEMPERATURE:
        raise InvalidRequest(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {pb.temperature}")
    kwargs = dict(
        temperature=pb.temperature,
        top_k=pb.top_k,
        stop_strings=tuple(pb.stop),
        stop_token_ids=tuple(pb.stop_token_ids),
        ignore_eos=pb.ignore_eos,
    )
    if pb.HasField("max_new_tokens"):
        kwargs["max_new_tokens"] = pb.max_new_tokens
    if pb.HasField("top_p"):
        kwargs["top_p"] = pb.top_p
    if pb.HasField("seed"):
        kwargs["seed"] = pb.seed
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        raise InvalidRequest(str(e)) from None


def prompt_ids_from_pb(pb: generate_pb2.GenerateRequest, tokenizer) -> list[int]:
    kind = pb.WhichOneof("prompt")
    if kind == "text":
        ids = list(tokenizer.encode(pb.text)) if pb.text else []
    elif kind == "token_ids":
        ids = list(pb.token_ids.ids)
    else:
        raise InvalidRequest("prompt is required: set text or token_ids")
    if not ids:
        raise InvalidRequest("prompt is empty")
    return ids


def adapter_id_from_pb(pb: generate_pb2.GenerateRequest) -> str | None:
    """None for the base model; InvalidRequest for an id no adapter can have."""
    adapter_id = pb.adapter_id
    if not adapter_id:
        return None
    if not ID_PATTERN.fullmatch(adapter_id) or ".." in adapter_id:
        shown = adapter_id if len(adapter_id) <= 64 else adapter_id[:64] + "..."
        raise InvalidRequest(f"adapter id {shown!r} is malformed: 1-128 letters, digits, '.', '_', '-', "
                             "starting with a letter or digit, without '..'")  # fmt: skip
    return adapter_id


def generation_request_from_pb(
    pb: generate_pb2.GenerateRequest, tokenizer, deadline: float | None = None
) -> GenerationRequest:
    """`deadline` is a time.monotonic() value (from the client's gRPC deadline) or None."""
    params = sampling_params_from_pb(pb.params)
    return GenerationRequest(
        prompt_token_ids=prompt_ids_from_pb(pb, tokenizer),
        params=params,
        adapter_id=adapter_id_from_pb(pb),
        deadline=deadline,
    )


def finish_reason_to_pb(reason: str) -> int:
    return _FINISH_TO_PB.get(reason, generate_pb2.FINISH_REASON_UNSPECIFIED)


def _usage(event: FinishEvent) -> generate_pb2.Usage:
    return generate_pb2.Usage(prompt_tokens=event.prompt_tokens, generated_tokens=event.generated_tokens)


def generate_response_to_pb(event: FinishEvent, request_id: str) -> generate_pb2.GenerateResponse:
    return generate_pb2.GenerateResponse(
        text=event.text,
        token_ids=event.token_ids,
        finish_reason=finish_reason_to_pb(event.finish_reason),
        usage=_usage(event),
        request_id=request_id,
    )


def stream_tokens_to_pb(event: TokenEvent, request_id: str) -> generate_pb2.GenerateStreamResponse:
    return generate_pb2.GenerateStreamResponse(text=event.text, token_ids=event.token_ids, request_id=request_id)


def stream_finish_to_pb(event: FinishEvent, request_id: str) -> generate_pb2.GenerateStreamResponse:
    """The last message of a stream: no new tokens (they came before), reason and usage."""
    return generate_pb2.GenerateStreamResponse(
        finish_reason=finish_reason_to_pb(event.finish_reason), usage=_usage(event), request_id=request_id
    )


def adapter_info_to_pb(info) -> admin_pb2.AdapterInfo:
    """`info`: the adapter manager's AdapterInfo (adapter_id, adapter_type, ranks,
    target_modules, size_bytes, resident, path, host_cached)."""
    return admin_pb2.AdapterInfo(
        adapter_id=info.adapter_id,
        adapter_type=str(info.adapter_type),
        ranks={name: admin_pb2.RankList(ranks=[int(r) for r in ranks]) for name, ranks in info.ranks.items()},
        target_modules=list(info.target_modules),
        size_bytes=int(info.size_bytes),
        resident=bool(info.resident),
        path=str(info.path),
        host_cached=bool(info.host_cached),
    )
