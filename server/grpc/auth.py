"""Bearer-token checks, as gRPC server interceptors. Callers send metadata
`authorization: Bearer <token>`; each interceptor guards the services it is given and
nothing else (health and reflection stay open).

`AdminAuthInterceptor` (the AdapterAdmin service):
- the configured admin token: allowed;
- no `authorization` metadata (or not a Bearer token): UNAUTHENTICATED;
- any other token, a client (API) token included: PERMISSION_DENIED;
- no admin token configured: PERMISSION_DENIED ("admin API disabled"), unless the server
  was started with insecure_admin, which accepts every caller (development on loopback).

`ClientAuthInterceptor` (the Generation service), only when API tokens are configured:
- one of the API tokens, or the admin token: allowed;
- no token, or a token that is neither: UNAUTHENTICATED.

The rules themselves are the service's (service.Access), shared with the HTTP front end;
this module maps them to status codes. Tokens are compared in constant time, each
against every configured token. Rejected calls are refused before the handler runs: an
upload's chunks are never read.
"""

from __future__ import annotations

import abc
from typing import Callable

import grpc

from loraplex.server import service

_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def rewrap_handler(
    handler: grpc.RpcMethodHandler, wrap: Callable, request_deserializer: Callable | None = None
) -> grpc.RpcMethodHandler:
    """A handler of the same kind whose behavior is wrap(behavior, streaming_response),
    and whose request deserializer is `request_deserializer` when given."""
    for kind in _KINDS:
        behavior = getattr(handler, kind)
        if behavior is not None:
            factory = getattr(grpc, f"{kind}_rpc_method_handler")
            return factory(
                wrap(behavior, handler.response_streaming),
                request_deserializer=request_deserializer or handler.request_deserializer,
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
            token = service.bearer_token(value)
            if token is not None:
                return token
    return None


_CODES = {service.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED, service.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED}


def _status(refusal: service.Refusal | None) -> tuple[grpc.StatusCode, str] | None:
    return None if refusal is None else (_CODES[refusal.kind], refusal.message)


class _GuardInterceptor(grpc.ServerInterceptor):
    """Refuses the calls to `services` for which check(metadata) returns a status."""

    def __init__(self, services: set[str]):
        self._services = frozenset(services)

    @abc.abstractmethod
    def check(self, metadata) -> tuple[grpc.StatusCode, str] | None:
        """The status refusing the call, or None to let it through."""

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


class AdminAuthInterceptor(_GuardInterceptor):
    def __init__(self, services: set[str], token: str | None, insecure: bool = False):
        super().__init__(services)
        self._access = service.Access(admin_token=token, insecure_admin=insecure)

    def check(self, metadata) -> tuple[grpc.StatusCode, str] | None:
        """None if the caller may proceed, else the status to refuse with."""
        return _status(self._access.admin_refusal(bearer_token(metadata)))


class ClientAuthInterceptor(_GuardInterceptor):
    """Generation calls need an API token or the admin token, once API tokens are set."""

    def __init__(self, services: set[str], api_tokens, admin_token: str | None = None):
        super().__init__(services)
        self._access = service.Access(admin_token=admin_token, api_tokens=api_tokens)

    @property
    def enabled(self) -> bool:
        return self._access.clients_need_token

    def check(self, metadata) -> tuple[grpc.StatusCode, str] | None:
        return _status(self._access.client_refusal(bearer_token(metadata)))
