"""Admin token check and per-RPC status accounting, as a gRPC server interceptor.

`AdminAuthInterceptor` guards every method of the services it is given (the
AdapterAdmin service) and nothing else:
- metadata `authorization: Bearer <token>` equal to the configured token: allowed;
- no `authorization` metadata (or not a Bearer token): UNAUTHENTICATED;
- a wrong token: PERMISSION_DENIED;
- no token configured: PERMISSION_DENIED ("admin API disabled"), unless the server was
  started with insecure_admin, which accepts every caller (development on loopback).
Rejected calls are refused before the handler runs: an upload's chunks are never read.
"""

from __future__ import annotations

import hmac
from typing import Callable

import grpc

_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def rewrap_handler(handler: grpc.RpcMethodHandler, wrap: Callable) -> grpc.RpcMethodHandler:
    """A handler of the same kind whose behavior is wrap(behavior, streaming_response)."""
    for kind in _KINDS:
        behavior = getattr(handler, kind)
        if behavior is not None:
            factory = getattr(grpc, f"{kind}_rpc_method_handler")
            return factory(
                wrap(behavior, handler.response_streaming),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


def service_of(method: str) -> str:
    # "/loraplex.v1.AdapterAdmin/ListAdapters" -> "loraplex.v1.AdapterAdmin"
    return method.lstrip("/").split("/", 1)[0]


def bearer_token(metadata) -> str | None:
    """The token of `authorization: Bearer <token>` metadata, else None."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class AdminAuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, services: set[str], token: str | None, insecure: bool = False):
        if token is not None and not token:
            raise ValueError("admin token must not be empty")
        self._services = frozenset(services)
        self._token = token.encode() if token else None
        self._insecure = insecure

    def check(self, metadata) -> tuple[grpc.StatusCode, str] | None:
        """None if the caller may proceed, else the status to refuse with."""
        if self._token is None:
            if self._insecure:
                return None
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                "admin API disabled: start the server with --admin-token or LORAPLEX_ADMIN_TOKEN",
            )
        presented = bearer_token(metadata)
        if presented is None:
            return grpc.StatusCode.UNAUTHENTICATED, "admin token required: metadata 'authorization: Bearer <token>'"
        if not hmac.compare_digest(presented.encode(), self._token):
            return grpc.StatusCode.PERMISSION_DENIED, "wrong admin token"
        return None

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or service_of(handler_call_details.method) not in self._services:
            return handler
        refusal = self.check(handler_call_details.invocation_metadata)
        if refusal is None:
            return handler

        def wrap(behavior, streaming_response):
            def refuse(request_or_iterator, context):
                context.abort(*refusal)

            return refuse

        return rewrap_handler(handler, wrap)
