"""One Ray Serve replica: one loraplex engine (one GPU, or a share of the CPU), its
service over the shared adapter root (shared_store.py), the OpenAI-compatible HTTP app
of server/http/app.py, and its own Prometheus endpoint.

HTTP reaches a replica through the router (router.py), which routes by the body's
`model`: `http(request)` / `http_stream(request)` run the request through this replica's
ASGI app in process (the app's routes, validation, errors and metrics, unchanged) and
return its response, or yield its start and body chunks. gRPC (loraplex.v1.Generation,
through Ray Serve's gRPC proxy and the router) reaches `grpc_generate` /
`grpc_generate_stream`, which run server/grpc/generation.py's servicer (grpc_bridge.py).

Routing: the multiplexed model is the adapter. Ray Serve sends a request that carries a
multiplexed model id (the router's `handle.options(multiplexed_model_id=...)`) to a
replica that holds it, else to the least loaded one; requests without one go to any
replica. On the replica, `_Multiplexed` reads the adapter from the body's `model` and
awaits the multiplexed loader, which makes the adapter current on this replica
(SharedStoreService.sync, in a thread) and so lets Ray Serve report it as held here.
The loader's LRU holds `adapter_slots` ids (`max_num_models_per_replica`): what Ray
routes to a replica is what its device pool holds.

Metrics: every series of this replica's registry gets a `replica` label (Ray Serve's
replica id) and is served by prometheus_client on its own port (any free one unless
`metrics_port` is set); with `metrics_sd_dir` the replica writes a Prometheus file_sd
target file `<dir>/<replica>.json` there, removed when the replica stops.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import socket
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector
from ray import serve

log = logging.getLogger(__name__)

REPLICA_HEADER = b"x-loraplex-replica"
_MODEL_ROUTES = ("/v1/completions", "/v1/chat/completions")


class LabelledRegistry(Collector):
    """Every sample of `registry`, with `labels` added."""

    def __init__(self, registry, labels: dict[str, str]):
        self._registry, self._labels = registry, labels

    def describe(self):
        return []

    def collect(self):
        for family in self._registry.collect():
            family.samples = [s._replace(labels={**s.labels, **self._labels}) for s in family.samples]
            yield family


class _Multiplexed:
    """ASGI middleware: awaits the multiplexed loader for the adapter a generation body's
    `model` names, then replays the body to the app; tags responses with the replica."""

    def __init__(self, app, replica: "LoraplexReplica", max_body_bytes: int):
        self.app, self.replica, self.max_body_bytes = app, replica, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        tag = (REPLICA_HEADER, self.replica.replica_id.encode())

        async def tagged_send(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=list(message.get("headers") or ()) + [tag])
            await send(message)

        length = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if scope.get("method") != "POST" or scope.get("path") not in _MODEL_ROUTES or \
                not length.isdigit() or int(length) > self.max_body_bytes:  # fmt: skip
            return await self.app(scope, receive, tagged_send)  # the app answers (413, 422, ...)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        await self.replica.make_current(_model_of(body))
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, tagged_send)


def _model_of(body: bytes) -> str | None:
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return None  # the route answers 422
    return model if isinstance(model, str) else None


@serve.deployment
class LoraplexReplica:
    def __init__(self, config, metrics_port: int | None = 0, metrics_sd_dir: str | None = None):
        """`config`: a ServeConfig; its engine.adapter_root is the shared adapter root."""
        from prometheus_client import start_http_server

        from loraplex.adapters.store import AdapterStore
        from loraplex.deploy.shared_store import SharedStoreService
        from loraplex.server.engine.engine import Engine
        from loraplex.server.metrics import ServerMetrics
        from loraplex.server.service import Access
        from loraplex.startup import quiet_bitsandbytes

        quiet_bitsandbytes()
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.actor_name = context.replica_id.to_full_id_str()
        self.config = config
        root = Path(config.engine.adapter_root)
        # adapters register lazily, on their first request (shared_store.py), not at start
        self.engine = Engine.from_config(dataclasses.replace(config.engine, adapter_root=None))
        self.engine.start()
        store_kwargs = {} if config.max_upload_bytes is None else {"max_upload_bytes": config.max_upload_bytes}
        self.store = AdapterStore(root, **store_kwargs)
        self.metrics = ServerMetrics(self.engine, max_adapter_series=config.metrics_max_adapters)
        self.service = SharedStoreService(self.engine, self.store, self.metrics, served_model_name=config.served_model_name)
        self.access = Access(config.admin_token, config.api_tokens, config.insecure_admin)
        self.engine.warmup()

        async def load_adapter(adapter_id: str) -> str:  # the multiplexed model: the adapter, current here
            if not await asyncio.to_thread(self.service.sync, adapter_id):
                raise KeyError(adapter_id)
            return adapter_id

        self._resident = serve.multiplexed(max_num_models_per_replica=self.engine.adapters.num_slots)(load_adapter)
        labelled = CollectorRegistry(auto_describe=False)
        labelled.register(LabelledRegistry(self.metrics.registry, {"replica": self.replica_id}))
        self._metrics_http = None
        self._sd_file = None
        if metrics_port is not None:
            host = "0.0.0.0" if config.host in ("0.0.0.0", "::") else config.host
            self._metrics_http, _ = start_http_server(metrics_port, addr=host, registry=labelled)
            self.metrics_port = self._metrics_http.server_port
            if metrics_sd_dir is not None:
                self._sd_file = Path(metrics_sd_dir) / f"{self.replica_id}.json"
                self._sd_file.parent.mkdir(parents=True, exist_ok=True)
                target = f"{socket.gethostname() if host == '0.0.0.0' else host}:{self.metrics_port}"
                tmp = self._sd_file.with_suffix(".tmp")
                tmp.write_text(json.dumps([{"targets": [target], "labels": {"replica": self.replica_id}}]))
                os.replace(tmp, self._sd_file)
        log.info("replica %s serving (adapter slots: %d, metrics port: %s)", self.replica_id,
                 self.engine.adapters.num_slots, getattr(self, "metrics_port", None))  # fmt: skip

        from loraplex.server.http.app import create_app

        max_body = config.max_receive_message_bytes
        self.app = _Multiplexed(create_app(self.service, self.access, self.metrics, max_body_bytes=max_body), self, max_body)

        from loraplex.server.grpc.auth import ClientAuthInterceptor
        from loraplex.server.grpc.generation import GenerationServicer

        self.grpc = GenerationServicer(self.service)  # gRPC through Ray's proxy (grpc_bridge.py)
        self._grpc_auth = ClientAuthInterceptor(set(), config.api_tokens, config.admin_token)  # its check() only

    # -- HTTP, from the router (router.py) ----------------------------------------------------
    async def _drive(self, request: dict):
        """The ASGI messages this replica's app sends for `request` (a scope's plain keys
        and `body`); the app sees the client leave when the caller stops iterating."""
        body = request["body"]
        scope = {k: v for k, v in request.items() if k != "body"}
        scope.setdefault("asgi", {"version": "3.0"})
        scope["headers"] = [(bytes(k), bytes(v)) for k, v in scope.get("headers") or ()]
        for key in ("client", "server"):
            if scope.get(key) is not None:
                scope[key] = tuple(scope[key])
        messages: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        sent = False

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            await messages.put(message)

        async def run():
            try:
                await self.app(scope, receive, send)
            finally:
                await messages.put(None)

        task = asyncio.create_task(run())
        try:
            while (message := await messages.get()) is not None:
                yield message
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    break
            await task  # the app's own errors surface here
        finally:
            gone.set()  # a stream the caller left: the app cancels its request

    async def http(self, request: dict) -> dict:
        """The response (status, headers, body) of this replica's app to `request`."""
        status, headers, chunks = 500, [], []
        async for message in self._drive(request):
            if message["type"] == "http.response.start":
                status, headers = message["status"], list(message.get("headers") or ())
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
        return {"status": status, "headers": headers, "body": b"".join(chunks)}

    async def http_stream(self, request: dict):
        """Streamed (handle.options(stream=True)): the response's start as a dict (status,
        headers), then its body chunks (server-sent events) as they come."""
        async for message in self._drive(request):
            if message["type"] == "http.response.start":
                yield {"status": message["status"], "headers": list(message.get("headers") or ())}
            elif message["type"] == "http.response.body" and message.get("body"):
                yield message["body"]

    async def make_current(self, model: str | None) -> None:
        """Awaits the multiplexed loader for the adapter `model` names (nothing for the base
        or an unknown model: the route answers 404)."""
        adapter = self.service.adapter_named(model) if model else None
        if adapter:
            try:
                await self._resident(adapter)
            except Exception:  # noqa: BLE001 — not in the store, or invalid: the route says which
                pass

    # -- gRPC, from the router (router.py, grpc_bridge.py) -------------------------------------
    async def grpc_generate(self, request, metadata=()):
        """loraplex.v1.Generation/Generate of a GenerateRequest, through this replica's
        GenerationServicer: (None, "", GenerateResponse) or (status code name, details, None).
        `metadata`: the client's `authorization` metadata (API tokens, as `serve` checks them)."""
        from loraplex.deploy import grpc_bridge

        if (refusal := self._grpc_auth.check(metadata)) is not None:
            return refusal[0].name, refusal[1], None
        await self._resident_for(request)
        return await grpc_bridge.unary(self.grpc, request)

    async def grpc_generate_stream(self, request, metadata=()):
        """Streamed (handle.options(stream=True)): GenerateStreamResponse messages, then a
        (status code name, details) tuple if the RPC ends with an error."""
        from loraplex.deploy import grpc_bridge

        if (refusal := self._grpc_auth.check(metadata)) is not None:
            yield refusal[0].name, refusal[1]
            return
        await self._resident_for(request)
        async for item in grpc_bridge.stream(self.grpc, request):
            yield item

    async def _resident_for(self, request) -> None:
        """The multiplexed loader for the request's adapter_id (an unknown one: the
        servicer answers NOT_FOUND)."""
        if request.adapter_id:
            try:
                await self._resident(request.adapter_id)
            except Exception as e:  # noqa: BLE001 — not in the store, or invalid: the servicer says which
                log.debug("adapter %r not made resident: %s", request.adapter_id, e)

    # -- handle methods (Python callers; the tests) -------------------------------------------
    async def upload(self, adapter_id: str, files: dict[str, bytes], replace: bool = False) -> dict:
        """Commits an adapter to the shared store (once) and registers it here."""

        def run():
            with self.service.begin_upload(adapter_id, replace=replace) as up:
                for name, data in files.items():
                    up.write(name, data)
                return dataclasses.asdict(up.commit())

        return await asyncio.to_thread(run)

    async def unload(self, adapter_id: str) -> None:
        await asyncio.to_thread(self.service.unload, adapter_id)

    def replica_info(self) -> dict:
        s = self.engine.stats()
        return dict(replica=self.replica_id, actor_name=self.actor_name, pid=os.getpid(),
                    metrics_port=getattr(self, "metrics_port", None), registrations=self.service.registrations,
                    adapter_loads=s.adapter_loads, adapter_evictions=s.adapter_evictions,
                    resident=sorted(k[0] for k in self.engine.adapters.device.resident))  # fmt: skip

    async def check_health(self) -> None:
        thread = self.engine._thread
        if thread is None or not thread.is_alive():
            raise RuntimeError("the engine thread is not running")

    def __del__(self):  # Ray Serve calls it when the replica stops
        self.engine.shutdown(min(self.config.shutdown_grace_s, 10.0))
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        if self._sd_file is not None:
            self._sd_file.unlink(missing_ok=True)
