"""loraplex.v1.Generation through Ray Serve's gRPC proxy (no Ray import here).

Ray Serve's gRPC proxy (gRPCOptions(grpc_servicer_functions=[GRPC_SERVICER])) decodes a
GenerateRequest and calls the ingress deployment's method of the RPC's name —
LoraplexRouter.Generate / GenerateStream (router.py) — with the request proto and a
`grpc_context` (Ray's RayServegRPCContext). The router forwards the proto to a replica
through the handle, with `multiplexed_model_id=request.adapter_id`; the replica runs it
through server/grpc/generation.py's GenerationServicer, unchanged (convert.py in,
service.submit, convert.py out, status.py's codes), against `ReplicaContext`: the part of
grpc.ServicerContext that the servicer uses, in which `abort` raises `Aborted`.

What travels back to the router: `unary` gives (code name, details, response); `stream`
yields response protos and, when the servicer aborts, a last `(code name, details)`
tuple. The router sets that code on Ray's grpc_context and raises `Aborted`: Ray's
replica wraps the exception with the code it finds set on the context (gRPCStatusError)
and its proxy ends the RPC with it.

No gRPC deadline reaches a deployment (Ray's context carries none): a request's time limit
is gRPCOptions.request_timeout_s (the proxy ends the RPC DEADLINE_EXCEEDED and cancels the
call, which cancels the engine request).
"""

from __future__ import annotations

import asyncio
import threading

import grpc

GRPC_SERVICER = "loraplex.v1.generate_pb2_grpc.add_GenerationServicer_to_server"


def grpc_options(port: int | None, request_timeout_s: float | None = None):
    """Ray Serve's gRPCOptions serving loraplex.v1.Generation on `port` (None: no gRPC)."""
    if port is None:
        return None
    from ray.serve.config import gRPCOptions

    return gRPCOptions(port=port, grpc_servicer_functions=[GRPC_SERVICER], request_timeout_s=request_timeout_s)


class Aborted(Exception):
    """An RPC the servicer (or the router) ended with a status code."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(code, details)  # both in args: it unpickles (it crosses to Ray's proxy)
        self.code, self.details = code, details

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class ReplicaContext:
    """What GenerationServicer asks of its grpc.ServicerContext, for one call on a replica."""

    def __init__(self):
        self._lock = threading.Lock()
        self._callbacks: list | None = []

    def time_remaining(self) -> float | None:
        return None

    def abort(self, code: grpc.StatusCode, details: str):
        raise Aborted(code, details)

    def add_callback(self, callback) -> bool:
        with self._lock:
            if self._callbacks is None:
                return False
            self._callbacks.append(callback)
            return True

    def is_active(self) -> bool:
        return self._callbacks is not None

    def end(self) -> None:
        """The call ended (done, or its caller left): runs the callbacks (handle.cancel)."""
        with self._lock:
            callbacks, self._callbacks = self._callbacks or [], None
        for callback in callbacks:
            callback()


async def unary(servicer, request) -> tuple[str | None, str, object]:
    """(None, "", response) or (code name, details, None) of servicer.Generate(request)."""
    context = ReplicaContext()
    try:
        response = await asyncio.to_thread(servicer.Generate, request, context)
        return None, "", response
    except Aborted as e:
        return e.code.name, e.details, None
    finally:
        context.end()


_END = object()


async def stream(servicer, request):
    """servicer.GenerateStream(request)'s messages, then (code name, details) if it aborted.
    The servicer's generator runs in its own thread; a caller that stops iterating ends
    the context, which cancels the engine request."""
    context = ReplicaContext()
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def put(item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody listens
            pass

    def run() -> None:
        try:
            for message in servicer.GenerateStream(request, context):
                put(message)
                if not context.is_active():
                    break
            put(_END)
        except Aborted as e:
            put((e.code.name, e.details))
        except BaseException as e:  # noqa: BLE001 — re-raised on the event loop
            put(e)

    threading.Thread(target=run, name="loraplex-grpc-stream", daemon=True).start()
    try:
        while (item := await queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, tuple):
                return
    finally:
        context.end()


def set_status(grpc_context, code_name: str, details: str) -> Aborted:
    """Sets `code_name` on Ray's grpc_context (when there is one) and returns the
    exception that ends the call with it (Ray's replica reads the code off the context)."""
    code = grpc.StatusCode[code_name]
    if grpc_context is not None:
        grpc_context.set_code(code)
        grpc_context.set_details(details)
    return Aborted(code, details)
