"""One place that maps engine, service and adapter exceptions to HTTP statuses, in
OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`.

    400 bad parameters, prompts too long, malformed JSON, unknown fields
    401 no or bad token            403 a token that may not call the admin API
    404 unknown model or adapter (never base-model output)
    409 the adapter exists         413 a body or an adapter over its cap
    429 the queue is full          503 warming up or draining

Unknown exceptions are 500 and logged, never disguised as a client error.
"""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse

from loraplex.adapters import errors as adapter_errors
from loraplex.server import service
from loraplex.server.engine import errors as engine_errors
from loraplex.server.engine.request import FINISH_ADAPTER_GONE, FINISH_CANCELLED, FINISH_DEADLINE, FINISH_ERROR, FinishEvent

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 2048

# Most specific first: UnknownModel is an UnknownAdapter (a KeyError), InvalidRequest a ValueError.
_CODES: tuple[tuple[type[BaseException], int, str, str | None], ...] = (
    (service.UnknownModel, 404, "invalid_request_error", "model_not_found"),
    (engine_errors.UnknownAdapter, 404, "invalid_request_error", "model_not_found"),
    (engine_errors.InvalidRequest, 400, "invalid_request_error", None),
    (engine_errors.QueueFull, 429, "rate_limit_error", "queue_full"),
    (engine_errors.EngineDraining, 503, "service_unavailable", "draining"),
    (service.NotReady, 503, "service_unavailable", "not_ready"),
    (service.NotStoredByUpload, 409, "invalid_request_error", None),
    (adapter_errors.AdapterExists, 409, "invalid_request_error", "adapter_exists"),
    (adapter_errors.AdapterTooLarge, 413, "invalid_request_error", "adapter_too_large"),
    (adapter_errors.AdapterNotFound, 404, "invalid_request_error", "adapter_not_found"),
    (adapter_errors.AdapterError, 400, "invalid_request_error", None),  # base class: last
)


KNOWN = (engine_errors.EngineError, adapter_errors.AdapterError)  # the bases of everything in _CODES


class HttpError(Exception):
    """An error answered as it is (auth refusals, oversized bodies, unknown routes)."""

    def __init__(self, status: int, message: str, type_: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


_REFUSALS = {
    service.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    service.PERMISSION_DENIED: (403, "permission_error", "permission_denied"),
}


def refusal_error(refusal: service.Refusal) -> HttpError:
    status, type_, code = _REFUSALS[refusal.kind]
    return HttpError(status, refusal.message, type_, code)


def body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + f"... ({len(message)} characters)"
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_for(exc: BaseException) -> HttpError | None:
    """The HttpError of a known exception, else None."""
    if isinstance(exc, HttpError):
        return exc
    for cls, status, type_, code in _CODES:
        if isinstance(exc, cls):
            param = getattr(exc, "param", None)
            if param is None and status == 404 and isinstance(exc, engine_errors.UnknownAdapter):
                param = "model"
            return HttpError(status, str(exc) or cls.__name__, type_, code, param)
    return None


def response(err: HttpError) -> JSONResponse:
    return JSONResponse(body(err.message, err.type, err.param, err.code), status_code=err.status)


def error_for_finish(event: FinishEvent) -> HttpError | None:
    """How a request that ended other than by length or stop is answered (None: success)."""
    if event.finish_reason == FINISH_ERROR:
        return HttpError(500, event.error or "generation failed", "server_error")
    if event.finish_reason == FINISH_ADAPTER_GONE:
        return HttpError(404, event.error or "the adapter was unloaded", "invalid_request_error", "model_not_found", "model")
    if event.finish_reason == FINISH_DEADLINE:
        return HttpError(504, "the request's deadline passed", "timeout")
    if event.finish_reason == FINISH_CANCELLED:
        return HttpError(503, "the request was cancelled: the server is shutting down", "service_unavailable", "draining")
    return None


def validation_error(errors) -> HttpError:
    """A pydantic RequestValidationError's first error, with the field as `param`."""
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        message = f"unsupported parameter: {param}"
    elif kind == "json_invalid":
        message, param = "the request body is not valid JSON", None
    elif kind == "missing":
        message = f"missing required parameter: {param}"
    else:
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else str(first.get("msg", "invalid request"))
    return HttpError(400, message, "invalid_request_error", None, param)
