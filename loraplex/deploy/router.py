"""The HTTP ingress of the Ray Serve app: a thin ASGI deployment in front of the replicas
that takes the multiplexed model id from the body's `model`.

Ray Serve's HTTP proxy picks a replica before it reads a body, so on its own it can only
route by the `serve_multiplexed_model_id` header. `LoraplexRouter` receives every HTTP
request instead, reads the body (once, up to the replicas' body cap), maps the
generation routes' `model` to an adapter id as the service does (`<base>:<adapter>` or
`<adapter>`; the base model's name: no adapter), and forwards the request through a
DeploymentHandle with `.options(multiplexed_model_id=<adapter>)`, so Ray sends it to a
replica that holds the adapter, else to the least loaded one. Everything else (the base
model, /v1/models, /health, load/unload) goes to any replica.

There is one HTTP layer: the router parses nothing but `model` and `stream`. A replica
serves the forwarded request through server/http/app.py's routes, in process
(LoraplexReplica.http / http_stream drive its ASGI app with the request's scope and
body), so validation, auth, errors and metrics are the replica's; the router passes its
status, headers (`x-loraplex-replica` among them) and body back as they are, and a
`stream: true` request's server-sent events chunk by chunk (a streaming handle call).

A replica that dies under a request: 503 (`service_unavailable`, code `replica_died`)
before the response began; a stream that had begun ends with `data: {"error": ...}`,
as the app ends a stream that fails.

gRPC: with Serve started with `grpc_options=grpc_bridge.grpc_options(port)`, Ray Serve's
gRPC proxy calls `Generate` / `GenerateStream` here with the request proto; they route by
`request.adapter_id` (the multiplexed id; none: any replica) to the replica's
`grpc_generate` / `grpc_generate_stream` (grpc_bridge.py) and end the RPC with the status
the replica's servicer chose (status.py's codes), set on Ray's `grpc_context`. A replica
that dies under a call: UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import json
import logging

from ray import serve

from loraplex.deploy.shared_store import adapter_named

log = logging.getLogger(__name__)

MODEL_ROUTES = ("/v1/completions", "/v1/chat/completions")
# scope keys that travel to the replica (all plain data)
_SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "query_string", "root_path",
               "headers", "client", "server")  # fmt: skip
_HOP_BY_HOP = (b"transfer-encoding", b"content-length", b"connection", b"keep-alive")


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    from ray import exceptions as ray_errors
    from ray.serve import exceptions as serve_errors

    names = [getattr(ray_errors, n, None) for n in ("RayActorError", "ActorDiedError", "ActorUnavailableError")]
    names += [getattr(serve_errors, n, None) for n in ("BackPressureError", "DeploymentUnavailableError")]
    return tuple(n for n in names if isinstance(n, type))


def _error_body(message: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "service_unavailable", "param": None, "code": code}}).encode()


def route_of(path: str, method: str, body: bytes, base_model: str) -> tuple[str, bool]:
    """(adapter id or "", stream) of a request: what the router routes by."""
    if method != "POST" or path not in MODEL_ROUTES:
        return "", False
    try:
        parsed = json.loads(body)
    except ValueError:
        return "", False  # the replica answers 400/422
    if not isinstance(parsed, dict):
        return "", False
    model = parsed.get("model")
    adapter = adapter_named(model, base_model) if isinstance(model, str) and model else None
    return adapter or "", parsed.get("stream") is True


class _Asgi:
    """The router as an ASGI 3 app (an object whose __call__ is a coroutine function:
    uvicorn takes a bound method for ASGI 2)."""

    def __init__(self, router: LoraplexRouter):
        self.router = router

    async def __call__(self, scope, receive, send):
        return await self.router.asgi(scope, receive, send)


@serve.deployment
@serve.ingress()
class LoraplexRouter:
    def __init__(self, replicas, base_model: str, max_body_bytes: int):
        """`replicas`: the handle of the LoraplexReplica deployment; `base_model`: the
        served model name; `max_body_bytes`: the replicas' body cap."""
        self.replicas, self.base_model, self.max_body_bytes = replicas, base_model, max_body_bytes
        self._unavailable = _unavailable_errors()

    def __serve_build_asgi_app__(self):
        return _Asgi(self)

    async def asgi(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body, complete = await self._read_body(receive)
        if body is None:
            return  # the client went away
        headers = [(k, v) for k, v in scope.get("headers") or () if k.lower() not in _HOP_BY_HOP]
        if complete:
            headers.append((b"content-length", str(len(body)).encode()))
        else:  # over the cap: the replica answers 413 (from the client's content-length, or by counting)
            headers += [(k, v) for k, v in scope.get("headers") or () if k.lower() == b"content-length"]
        request = {k: scope[k] for k in _SCOPE_KEYS if k in scope}
        request["headers"] = headers
        request["body"] = body
        adapter, stream = route_of(scope.get("path", ""), scope.get("method", ""), body, self.base_model) \
            if complete else ("", False)  # fmt: skip
        handle = self.replicas.options(multiplexed_model_id=adapter) if adapter else self.replicas
        if stream:
            return await self._stream(handle, request, receive, send)
        try:
            response = await handle.http.remote(request)
        except self._unavailable as e:
            log.warning("replica unavailable: %s", e)
            return await self._send_unavailable(send, e)
        await send({"type": "http.response.start", "status": response["status"], "headers": response["headers"]})
        await send({"type": "http.response.body", "body": response["body"], "more_body": False})

    # -- gRPC: loraplex.v1.Generation through Ray Serve's gRPC proxy (grpc_bridge.py) -------
    def _grpc_call(self, request, grpc_context):
        """(handle, metadata): the replicas' handle routed by request.adapter_id (none:
        any replica), and the client's `authorization` metadata for the replica to check."""
        handle = self.replicas.options(multiplexed_model_id=request.adapter_id) if request.adapter_id else self.replicas
        metadata = [(k, v) for k, v in (grpc_context.invocation_metadata() if grpc_context is not None else ())
                    if k.lower() == "authorization"]  # fmt: skip
        return handle, metadata

    async def Generate(self, request, grpc_context=None):
        """loraplex.v1.Generation/Generate: a GenerateRequest in, a GenerateResponse out."""
        from loraplex.deploy.grpc_bridge import set_status

        handle, metadata = self._grpc_call(request, grpc_context)
        try:
            code, details, response = await handle.grpc_generate.remote(request, metadata)
        except self._unavailable as e:
            log.warning("replica unavailable: %s", e)
            code, details = "UNAVAILABLE", f"the replica serving this request is unavailable ({type(e).__name__}); retry"
        if code is not None:
            raise set_status(grpc_context, code, details)
        return response

    async def GenerateStream(self, request, grpc_context=None):
        """loraplex.v1.Generation/GenerateStream: GenerateStreamResponse messages as the
        replica's servicer yields them."""
        from loraplex.deploy.grpc_bridge import set_status

        handle, metadata = self._grpc_call(request, grpc_context)
        gen = handle.options(stream=True).grpc_generate_stream.remote(request, metadata)
        status = None
        try:
            async for item in gen:
                if isinstance(item, tuple):
                    status = item
                    break
                yield item
        except self._unavailable as e:
            log.warning("replica unavailable mid-stream: %s", e)
            status = "UNAVAILABLE", f"the replica serving this stream is unavailable ({type(e).__name__})"
        except BaseException:  # the client left (cancelled), or a replica bug
            gen.cancel()
            raise
        if status is not None:
            raise set_status(grpc_context, *status)

    async def _read_body(self, receive) -> tuple[bytes | None, bool]:
        """(body, complete): the body, or its first max_body_bytes + 1 bytes (complete False)."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None, False
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                return b"".join(chunks)[: self.max_body_bytes + 1], False
        return b"".join(chunks), True

    async def _send_unavailable(self, send, error: BaseException, status: int = 503) -> None:
        body = _error_body(f"the replica serving this request is unavailable ({type(error).__name__}); retry",
                           "replica_died")  # fmt: skip
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _stream(self, handle, request, receive, send) -> None:
        gen = handle.options(stream=True).http_stream.remote(request)

        async def watch() -> None:  # a client that goes away cancels the replica's stream
            while (await receive())["type"] != "http.disconnect":
                pass
            gen.cancel()

        watcher = asyncio.create_task(watch())
        started = False
        try:
            async for item in gen:
                if isinstance(item, dict):  # the response start: status and headers
                    await send({"type": "http.response.start", "status": item["status"], "headers": item["headers"]})
                    started = True
                elif item:
                    await send({"type": "http.response.body", "body": item, "more_body": True})
        except self._unavailable as e:
            log.warning("replica unavailable mid-stream: %s", e)
            if not started:
                return await self._send_unavailable(send, e)
            err = json.loads(_error_body(f"the replica serving this stream died ({type(e).__name__})", "replica_died"))
            await send({"type": "http.response.body", "body": f"data: {json.dumps(err)}\n\n".encode(), "more_body": True})
        except asyncio.CancelledError:
            gen.cancel()
            raise
        except Exception as e:  # noqa: BLE001 — cancelled (the client left), or a replica bug
            log.warning("stream ended by %s: %s", type(e).__name__, e)
            if not started:
                return await self._send_unavailable(send, e, 500)
        finally:
            watcher.cancel()
        if started:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            await self._send_unavailable(send, RuntimeError("the replica's stream ended before it began"))
