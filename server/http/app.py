"""The OpenAI-compatible routes: parse the pydantic request (schemas.py), call the
service (service.py), answer JSON or server-sent events. Limits, validation, model
names, adapters and latency metrics are the service's; errors are errors.py's.

    POST /v1/completions        POST /v1/chat/completions      GET /v1/models
    POST /v1/load_lora_adapter  POST /v1/unload_lora_adapter   (admin token)
    GET  /health                200 when serving, 503 while warming up or draining

Streams: `data: {chunk}` per token event, the finish chunk, a usage chunk with
stream_options.include_usage, then `data: [DONE]`; a request that fails after the
stream began ends with `data: {"error": ...}`. A client that disconnects cancels its
request (the engine frees its KV blocks).

Events come from the engine's thread: the handle's listener wakes this event loop
(call_soon_threadsafe), so no thread waits per stream.
"""

from __future__ import annotations

import asyncio
import json
import logging

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.server.engine.request import FinishEvent, RequestHandle, TokenEvent
from loraplex.server.http import errors, schemas
from loraplex.server.service import Access, Service, bearer_token

log = logging.getLogger(__name__)

_METHODS = {  # path -> the `method` label of loraplex_requests_total{frontend="http"}
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat.completions",
    "/v1/models": "models",
    "/v1/load_lora_adapter": "load_lora_adapter",
    "/v1/unload_lora_adapter": "unload_lora_adapter",
    "/health": "health",
}


async def handle_events(handle: RequestHandle, observer):
    """The handle's events in this event loop, each seen by the service's observer."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()

    def notify() -> None:  # the engine's thread
        try:
            loop.call_soon_threadsafe(wake.set)
        except RuntimeError:  # the loop has closed
            pass

    handle.set_listener(notify)
    try:
        while True:
            wake.clear()
            event = handle.next_event()
            if event is None:
                await wake.wait()
                continue
            observer.see(event)
            yield event
            if isinstance(event, FinishEvent):
                return
    finally:
        handle.set_listener(None)
        if handle.finished is None:
            handle.cancel()


class _EventStream(StreamingResponse):
    """Server-sent events that cancel their request however the response ends."""

    def __init__(self, content, handle: RequestHandle):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._handle = handle

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._handle.finished is None:
                self._handle.cancel()


async def _cancel_on_disconnect(request: Request, handle: RequestHandle) -> None:
    """Cancels `handle` when the client disconnects (the body is read: receive() waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    handle.cancel()


def _sse(data) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n".encode()


class _Middleware:
    """Counts every request by route and status (frontend="http"); refuses bodies over
    `max_body_bytes` with 413 before a route reads them."""

    def __init__(self, app, metrics, max_body_bytes: int):
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500, "started": False}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        try:
            length = dict(scope.get("headers") or ()).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                err = errors.HttpError(413, f"the request body is over {self.max_body_bytes} bytes", "invalid_request_error")
                return await errors.response(err)(scope, receive, counted_send)
            received = {"bytes": 0}

            async def capped_receive():
                message = await receive()
                if message["type"] == "http.request":
                    received["bytes"] += len(message.get("body", b""))
                    if received["bytes"] > self.max_body_bytes:
                        raise errors.HttpError(413, f"the request body is over {self.max_body_bytes} bytes", "invalid_request_error")
                return message

            await self.app(scope, capped_receive, counted_send)
        except errors.HttpError as err:
            if status["started"]:
                raise
            await errors.response(err)(scope, receive, counted_send)
        finally:
            if self.metrics is not None:
                self.metrics.count_request(_METHODS.get(scope.get("path", ""), "_other"), str(status["code"]), frontend="http")


def create_app(service: Service, access: Access, metrics=None, max_body_bytes: int = 4 << 20) -> FastAPI:
    app = FastAPI(title="loraplex", docs_url=None, redoc_url=None, openapi_url=None)

    # -- errors ---------------------------------------------------------------------------
    @app.exception_handler(errors.HttpError)
    async def _http_error(request, exc: errors.HttpError):
        return errors.response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        return errors.response(errors.validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(request, exc: StarletteHTTPException):
        return errors.response(errors.HttpError(exc.status_code, str(exc.detail), "invalid_request_error"))

    async def _known(request, exc: Exception):
        return errors.response(errors.error_for(exc))

    for cls in errors.KNOWN:  # by class: the catch-all below is for faults (500, logged)
        app.add_exception_handler(cls, _known)

    @app.exception_handler(Exception)
    async def _fault(request, exc: Exception):
        log.error("unexpected error in %s", request.url.path, exc_info=exc)
        return errors.response(errors.HttpError(500, "internal server error", "server_error"))

    # -- access ---------------------------------------------------------------------------
    def client(request: Request) -> None:
        refusal = access.client_refusal(bearer_token(request.headers.get("authorization")))
        if refusal is not None:
            raise errors.refusal_error(refusal)

    def admin(request: Request) -> None:
        refusal = access.admin_refusal(bearer_token(request.headers.get("authorization")))
        if refusal is not None:
            raise errors.refusal_error(refusal)

    # -- routes ---------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not service.ready:
            return JSONResponse({"status": "NOT_SERVING"}, status_code=503)
        return {"status": "SERVING"}

    @app.get("/v1/models", dependencies=[Depends(client)])
    async def models():
        return schemas.model_list(service.models(), schemas.now())

    @app.post("/v1/completions", dependencies=[Depends(client)])
    async def completions(body: schemas.CompletionRequest, request: Request):
        body.check_supported()
        adapter_id = service.adapter_for_model(body.model)
        prompt = service.encode(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)
        max_tokens = schemas.COMPLETIONS_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        return await _generate(body, prompt, adapter_id, max_tokens, request, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(client)])
    async def chat_completions(body: schemas.ChatCompletionRequest, request: Request):
        body.check_supported()
        adapter_id = service.adapter_for_model(body.model)
        prompt = service.encode_chat([m.as_dict() for m in body.messages])
        max_tokens = service.remaining_tokens(len(prompt)) if body.max_new_tokens is None else body.max_new_tokens
        return await _generate(body, prompt, adapter_id, max_tokens, request, chat=True)

    @app.post("/v1/load_lora_adapter", dependencies=[Depends(admin)])
    async def load_lora_adapter(body: schemas.LoadLoraRequest):
        await asyncio.to_thread(service.load, body.lora_name, body.lora_path)  # reads and converts the adapter
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=[Depends(admin)])
    async def unload_lora_adapter(body: schemas.UnloadLoraRequest):
        service.unload(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    async def _generate(body, prompt: list[int], adapter_id: str | None, max_tokens: int, request: Request, chat: bool):
        mixture = body.mixture(adapter_id)
        handle = service.submit(service.request(prompt, body.sampling_params(max_tokens), adapter_id, adapters=mixture))
        events = handle_events(handle, service.observer(handle))
        rid, created = schemas.new_id("chatcmpl" if chat else "cmpl"), schemas.now()
        if body.stream:
            return _EventStream(_stream(events, rid, created, body, chat), handle)
        finish = None
        gone = asyncio.create_task(_cancel_on_disconnect(request, handle))  # the client may leave before the answer
        try:
            async for event in events:
                finish = event if isinstance(event, FinishEvent) else finish
        finally:
            gone.cancel()
            await events.aclose()
        err = errors.error_for_finish(finish)
        if err is not None:
            raise err
        build = schemas.chat_completion if chat else schemas.completion
        return build(rid, created, body.model, finish, body.return_token_ids)

    async def _stream(events, rid: str, created: int, body, chat: bool):
        model, ids = body.model, body.return_token_ids
        try:
            if chat:
                yield _sse(schemas.chat_chunk(rid, created, model, {"role": "assistant", "content": ""}))
            async for event in events:
                if isinstance(event, TokenEvent):
                    tokens = event.token_ids if ids else None
                    if chat:
                        yield _sse(schemas.chat_chunk(rid, created, model, {"content": event.text}, token_ids=tokens))
                    else:
                        yield _sse(schemas.completion_chunk(rid, created, model, event.text, token_ids=tokens))
                    continue
                err = errors.error_for_finish(event)
                if err is not None:
                    yield _sse(errors.body(err.message, err.type, err.param, err.code))
                    return
                reason = schemas.FINISH_REASONS[event.finish_reason]
                if chat:
                    yield _sse(schemas.chat_chunk(rid, created, model, {}, reason))
                else:
                    yield _sse(schemas.completion_chunk(rid, created, model, "", reason))
                if body.include_usage:
                    obj = "chat.completion.chunk" if chat else "text_completion"
                    yield _sse(schemas.usage_chunk(rid, created, model, obj, event))
                yield _sse("[DONE]")
        finally:
            await events.aclose()

    return _Middleware(app, metrics, max_body_bytes)
