"""loraplex.v1.Generation: protobuf in, service.submit, protobuf out.

Each RPC converts its request (convert.py; the request types validate themselves, so bad
arguments fail here, before the queue), submits it through the service (service.py),
and relays the handle's events. The RPC's end — completion, client cancellation,
deadline — cancels the handle, so the engine frees the request's KV blocks; the client's
deadline also travels with the request to the engine. Failures map to status codes in
status.py. Latency metrics come from the service's observer, as for every front end.
"""

from __future__ import annotations

import time

import grpc

from loraplex.server.engine.request import FinishEvent, RequestHandle, TokenEvent
from loraplex.server.grpc import convert
from loraplex.server.grpc.status import abort_for, status_for_finish
from loraplex.server.service import Service
from loraplex.v1 import generate_pb2_grpc


def client_deadline(context: grpc.ServicerContext) -> float | None:
    """The client's gRPC deadline as a time.monotonic() value, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class GenerationServicer(generate_pb2_grpc.GenerationServicer):
    def __init__(self, service: Service):
        self._service = service

    def Generate(self, request, context):
        handle = self._submit(request, context)
        try:
            finish = None
            for event in self._observed(handle, context):
                if isinstance(event, FinishEvent):
                    finish = event
        finally:
            if handle.finished is None:
                handle.cancel()
        refusal = status_for_finish(finish)
        if refusal is not None:
            context.abort(*refusal)
        return convert.generate_response_to_pb(finish, handle.request.request_id)

    def GenerateStream(self, request, context):
        handle = self._submit(request, context)
        request_id = handle.request.request_id
        try:
            for event in self._observed(handle, context):
                if isinstance(event, TokenEvent):
                    yield convert.stream_tokens_to_pb(event, request_id)
                elif (refusal := status_for_finish(event)) is not None:
                    context.abort(*refusal)
                else:
                    yield convert.stream_finish_to_pb(event, request_id)
        finally:  # also when gRPC closes the generator after a cancellation
            if handle.finished is None:
                handle.cancel()

    # ------------------------------------------------------------------------------------
    def _submit(self, request, context) -> RequestHandle:
        try:
            self._service.check_ready()
            gen_request = convert.generation_request_from_pb(request, self._service, client_deadline(context))
            handle = self._service.submit(gen_request)
        except Exception as e:  # noqa: BLE001 — status.py decides; unknown errors re-raise
            abort_for(context, e)
        if not context.add_callback(handle.cancel):  # the RPC already ended
            handle.cancel()
        return handle

    def _observed(self, handle: RequestHandle, context):
        """The handle's events, seen by the service's observer (latency, token counts)."""
        observer = self._service.observer(handle)
        for event in _while_active(handle, context):
            observer.see(event)
            yield event


def _while_active(handle: RequestHandle, context, poll_s: float = 1.0):
    """The handle's events for as long as the RPC is alive: a worker thread never waits
    forever on a request whose client is gone (it cancels the request instead)."""
    while True:
        try:
            yield from handle.events(timeout=poll_s)
            return
        except TimeoutError:
            if not context.is_active():
                handle.cancel()
                return
