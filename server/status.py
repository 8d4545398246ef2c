"""One place that maps engine and adapter exceptions to gRPC status codes.

    code, message = status_for(exc)      # None for an exception we do not know
    abort_for(context, exc)              # aborts the RPC (raises) or re-raises exc
    status_for_finish(event)             # None when a finished request is a success

The servicers catch `Exception`, hand it here, and never pick a code themselves.
Unknown exceptions are re-raised so that gRPC reports them as UNKNOWN and they are
logged, instead of being disguised as a client error.
"""

from __future__ import annotations

import grpc

from loraplex.server.engine import errors as engine_errors
from loraplex.server.engine.request import FINISH_CANCELLED, FINISH_DEADLINE, FINISH_ERROR, FinishEvent

# Most specific first: UnknownAdapter is a KeyError, InvalidRequest a ValueError.
_ENGINE_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (engine_errors.InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (engine_errors.UnknownAdapter, grpc.StatusCode.NOT_FOUND),
    (engine_errors.QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (engine_errors.EngineDraining, grpc.StatusCode.UNAVAILABLE),
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


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status code and message for a known exception, else None."""
    for cls, code in _ENGINE_CODES + _adapter_codes():
        if isinstance(exc, cls):
            return code, str(exc) or cls.__name__
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
    if event.finish_reason == FINISH_DEADLINE:
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed"
    if event.finish_reason == FINISH_CANCELLED:
        # The client's own cancellation ends the RPC before this is sent; a request still
        # listened to was cancelled by the server's shutdown.
        return grpc.StatusCode.UNAVAILABLE, "the request was cancelled: the server is shutting down"
    return None
