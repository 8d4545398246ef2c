"""Protobuf <-> loraplex objects. No engine calls, no gRPC context.

Requests: `generation_request_from_pb` turns a GenerateRequest into a GenerationRequest
through the service (service.py tokenizes a text prompt and caps its size); the limits
(stop strings and stop token ids, temperatures so small that the sampler's logits /
temperature overflow, malformed adapter ids) are the request types' own checks
(engine/request.py), raising InvalidRequest before the engine's queue sees the request.
Whether an id is registered is the engine's question (NOT_FOUND).
Responses: FinishEvent / TokenEvent -> GenerateResponse / GenerateStreamResponse,
AdapterInfo -> loraplex.v1.AdapterInfo.
"""

from __future__ import annotations

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
    return SamplingParams(**kwargs)


def prompt_from_pb(pb: generate_pb2.GenerateRequest) -> str | list[int]:
    kind = pb.WhichOneof("prompt")
    if kind == "text":
        return pb.text
    if kind == "token_ids":
        return list(pb.token_ids.ids)
    raise InvalidRequest("prompt is required: set text or token_ids")


def generation_request_from_pb(pb: generate_pb2.GenerateRequest, service, deadline: float | None = None) -> GenerationRequest:
    """`service`: the Service (it tokenizes); `deadline`: a time.monotonic() value (from the
    client's gRPC deadline) or None."""
    params = sampling_params_from_pb(pb.params)
    adapters = tuple((a.adapter_id, a.weight) for a in pb.adapters)  # a mixture; both set: GenerationRequest refuses
    return service.request(prompt_from_pb(pb), params, adapter_id=pb.adapter_id or None, deadline=deadline, adapters=adapters)


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
