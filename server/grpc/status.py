"""One place that maps engine, service and adapter exceptions to gRPC status codes.

    code, message = status_for(exc)      # None for an exception we do not know
    abort_for(context, exc)              # aborts the RPC (raises) or re-raises exc
    status_for_finish(event)             # None when a finished request is a success
    UndecodableRequestInterceptor(...)   # bytes that are no valid request: INVALID_ARGUMENT
    StatusInterceptor(...)               # reports each RPC's method and final code (metrics)

The servicers catch `Exception`, hand it here, and never pick a code themselves.
Unknown exceptions are re-raised so that gRPC reports them as UNKNOWN and they are
logged, instead of being disguised as a client error. Messages are cut to
MAX_DETAILS_BYTES: they may quote what the client sent (an id, a path), and status
details travel in trailing metadata, which clients cap (8 KiB by default; past it the
client sees RESOURCE_EXHAUSTED "Stream removed" instead of the status we sent).
"""

from __future__ import annotations

from typing import Callable

import grpc

from loraplex.server import service
from loraplex.server.engine import errors as engine_errors
from loraplex.server.engine.request import FINISH_ADAPTER_GONE, FINISH_CANCELLED, FINISH_DEADLINE, FINISH_ERROR, FinishEvent
from loraplex.server.grpc.auth import rewrap_handler, service_of

# Most specific first: UnknownAdapter is a KeyError, InvalidRequest a ValueError.
_ENGINE_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (engine_errors.InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (engine_errors.UnknownAdapter, grpc.StatusCode.NOT_FOUND),
    (engine_errors.QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (engine_errors.EngineDraining, grpc.StatusCode.UNAVAILABLE),
    (service.NotReady, grpc.StatusCode.UNAVAILABLE),
    (service.NotStoredByUpload, grpc.StatusCode.FAILED_PRECONDITION),
)


def _adapter_codes() -> tuple[tuple[type[BaseException], grpc.StatusCode], ...]:
    """loraplex.adapters.errors, when present (written alongside this module)."""
    try:
        from loraplex.adapters import errors as adapter_errors
    except ImportError:
        return ()
    pairs = []
    for name, code in (
        ("AdapterExists", grpc.StatusCode.ALREADY_EXISTS),
        ("AdapterTooLarge", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("AdapterNotFound", grpc.StatusCode.NOT_FOUND),
        ("AdapterError", grpc.StatusCode.INVALID_ARGUMENT),  # base class: last
    ):
        cls = getattr(adapter_errors, name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            pairs.append((cls, code))
    return tuple(pairs)


MAX_DETAILS_BYTES = 2048  # as sent: gRPC percent-encodes '%' and non-ASCII bytes (x3)


def short_details(message: str) -> str:
    """`message`, cut so that it travels in at most MAX_DETAILS_BYTES."""
    size = 0
    for i, ch in enumerate(message):
        size += 1 if " " <= ch <= "~" and ch != "%" else 3 * len(ch.encode("utf-8", "surrogatepass"))
        if size > MAX_DETAILS_BYTES - 32:
            return message[:i] + f"... ({len(message)} characters)"
    return message


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status code and message for a known exception, else None."""
    for cls, code in _ENGINE_CODES + _adapter_codes():
        if isinstance(exc, cls):
            return code, short_details(str(exc) or cls.__name__)
    return None


def abort_for(context: grpc.ServicerContext, exc: BaseException):
    """Aborts the RPC with the mapped status; re-raises `exc` when it is not ours."""
    mapped = status_for(exc)
    if mapped is None:
        raise exc
    context.abort(*mapped)


def status_for_finish(event: FinishEvent) -> tuple[grpc.StatusCode, str] | None:
    """How a request that ended other than by length or stop ends its RPC. Partial output
    already streamed stays with the client; a unary call returns no partial result."""
    if event.finish_reason == FINISH_ERROR:
        return grpc.StatusCode.INTERNAL, event.error or "generation failed"
    if event.finish_reason == FINISH_ADAPTER_GONE:
        return grpc.StatusCode.NOT_FOUND, event.error or "the adapter was unloaded"
    if event.finish_reason == FINISH_DEADLINE:
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed"
    if event.finish_reason == FINISH_CANCELLED:
        # The client's own cancellation ends the RPC before this is sent; a request still
        # listened to was cancelled by the server's shutdown.
        return grpc.StatusCode.UNAVAILABLE, "the request was cancelled: the server is shutting down"
    return None


class _Undecodable:
    """Stands in for a request message that did not parse."""

    __slots__ = ("error",)

    def __init__(self, error: str):
        self.error = error


def _tolerant(deserializer):
    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as e:  # noqa: BLE001 — protobuf's DecodeError, or anything a parser raises
            return _Undecodable(str(e) or type(e).__name__)

    return deserialize


def _refusal(undecodable: _Undecodable) -> tuple[grpc.StatusCode, str]:
    return grpc.StatusCode.INVALID_ARGUMENT, short_details(f"the request message does not parse: {undecodable.error}")


class UndecodableRequestInterceptor(grpc.ServerInterceptor):
    """Bytes that are not a valid request (invalid UTF-8 in a string field, a truncated
    message, a wrong wire type) get INVALID_ARGUMENT. gRPC itself would answer INTERNAL
    ("Exception deserializing request!"), a server fault. Streamed requests are refused
    at the first bad message; the messages before it have been handled."""

    def __init__(self, services: set[str]):
        self._services = frozenset(services)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if (
            handler is None
            or handler.request_deserializer is None
            or service_of(handler_call_details.method) not in self._services
        ):
            return handler

        def wrap(behavior, streaming_response):
            if handler.request_streaming:

                def checked_stream(request_iterator, context):
                    def messages():
                        for message in request_iterator:
                            if isinstance(message, _Undecodable):
                                context.abort(*_refusal(message))
                            yield message

                    return behavior(messages(), context)

                return checked_stream

            def checked(request, context):
                if isinstance(request, _Undecodable):
                    context.abort(*_refusal(request))
                return behavior(request, context)

            return checked

        return rewrap_handler(handler, wrap, request_deserializer=_tolerant(handler.request_deserializer))


class StatusInterceptor(grpc.ServerInterceptor):
    """Calls record(method_name, code_name) once per RPC when it ends (ServerMetrics.count_request)."""

    def __init__(self, services: set[str], record: Callable[[str, str], None]):
        self._services = frozenset(services)
        self._record = record

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or service_of(method) not in self._services:
            return handler
        name = method.rsplit("/", 1)[-1]
        record = self._record

        def final_code(context, failed: bool) -> str:
            code = context.code()
            if code is not None:
                return code.name
            if not context.is_active():
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:
                    return "DEADLINE_EXCEEDED"
                return "CANCELLED"
            return "UNKNOWN" if failed else "OK"

        def wrap(behavior, streaming_response):
            if streaming_response:

                def stream_behavior(request_or_iterator, context):
                    failed = True
                    try:
                        yield from behavior(request_or_iterator, context)
                        failed = False
                    finally:
                        record(name, final_code(context, failed))

                return stream_behavior

            def unary_behavior(request_or_iterator, context):
                failed = True
                try:
                    response = behavior(request_or_iterator, context)
                    failed = False
                    return response
                finally:
                    record(name, final_code(context, failed))

            return unary_behavior

        return rewrap_handler(handler, wrap)
