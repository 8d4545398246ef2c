"""Protobuf <-> loraplex objects. Pure functions: no engine calls, no gRPC context.

Requests: `generation_request_from_pb` turns a GenerateRequest into a GenerationRequest
(tokenizing a text prompt with the tokenizer it is given); anything wrong with the
request raises InvalidRequest here, before the engine's queue sees it.
Responses: FinishEvent / TokenEvent -> GenerateResponse / GenerateStreamResponse,
AdapterInfo -> loraplex.v1.AdapterInfo.
"""

from __future__ import annotations

from loraplex.server.engine.errors import InvalidRequest
from loraplex.server.engine.request import (
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

_FINISH_TO_PB = {
    FINISH_LENGTH: generate_pb2.FINISH_REASON_LENGTH,
    FINISH_STOP: generate_pb2.FINISH_REASON_STOP,
    FINISH_CANCELLED: generate_pb2.FINISH_REASON_CANCELLED,
    FINISH_DEADLINE: generate_pb2.FINISH_REASON_DEADLINE,
    FINISH_ERROR: generate_pb2.FINISH_REASON_ERROR,
}


def sampling_params_from_pb(pb: generate_pb2.SamplingParameters) -> SamplingParams:
    """Unset optional fields take SamplingParams' defaults. InvalidRequest names the field."""
    if len(pb.stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings, got {len(pb.stop)}")
    if any(len(s) > MAX_STOP_STRING_CHARS for s in pb.stop):
        raise InvalidRequest(f"stop strings are at most {MAX_STOP_STRING_CHARS} characters")
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


def generation_request_from_pb(
    pb: generate_pb2.GenerateRequest, tokenizer, deadline: float | None = None
) -> GenerationRequest:
    """`deadline` is a time.monotonic() value (from the client's gRPC deadline) or None."""
    params = sampling_params_from_pb(pb.params)
    return GenerationRequest(
        prompt_token_ids=prompt_ids_from_pb(pb, tokenizer),
        params=params,
        adapter_id=pb.adapter_id or None,
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
    """`info`: the catalog's AdapterInfo (adapter_id, adapter_type, ranks, target_modules,
    size_bytes, resident, path)."""
    return admin_pb2.AdapterInfo(
        adapter_id=info.adapter_id,
        adapter_type=str(info.adapter_type),
        ranks={name: admin_pb2.RankList(ranks=[int(r) for r in ranks]) for name, ranks in info.ranks.items()},
        target_modules=list(info.target_modules),
        size_bytes=int(info.size_bytes),
        resident=bool(info.resident),
        path=str(info.path),
    )
