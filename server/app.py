"""The loraplex server: one engine and one service layer (service.py) behind gRPC
(Generation, AdapterAdmin, grpc.health.v1, server reflection; server/grpc/), the
OpenAI-compatible HTTP API (server/http/, with http_port set) and a Prometheus HTTP
endpoint.

    server = LoraplexServer(ServeConfig(engine=EngineConfig(...), port=0, metrics_port=0))
    server.start()      # loads the model, serves; health NOT_SERVING
    server.warm_up()    # one tiny generation; health SERVING
    ...
    server.stop(grace_s)  # health NOT_SERVING, refuse new requests (UNAVAILABLE / 503), let
                          # running ones finish within grace_s, cancel the rest, close

The HTTP API runs in a thread of this process (uvicorn), on the same engine; it is
imported only when http_port is set, so nothing on the engine's path needs FastAPI.

Access: admin RPCs need the admin token (auth.py); with api_tokens set, generation
needs one of them (or the admin token); health and reflection stay open; the HTTP API
applies the same rules (service.Access). With tls_cert and tls_key the gRPC and HTTP
ports speak only TLS (grpc/tls.py); tls_client_ca also requires client certificates
signed by that CA. A request message that does not parse is
INVALID_ARGUMENT (grpc/status.py), one over max_receive_message_bytes RESOURCE_EXHAUSTED
(an HTTP body over it: 413).

Signals are the CLI's business (cli.py), not this module's. No argparse here.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import threading
from concurrent import futures
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loraplex.server.grpc import tls
from loraplex.server.grpc.admin import AdapterAdminServicer
from loraplex.server.grpc.auth import AdminAuthInterceptor, ClientAuthInterceptor
from loraplex.server.grpc.generation import GenerationServicer
from loraplex.server.grpc.status import StatusInterceptor, UndecodableRequestInterceptor
from loraplex.server.metrics import ServerMetrics
from loraplex.server.service import Access, Service
from loraplex.v1 import admin_pb2, admin_pb2_grpc, generate_pb2, generate_pb2_grpc

log = logging.getLogger(__name__)

GENERATION_SERVICE = generate_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdapterAdmin"].full_name
_LOOPBACK_NAMES = {"localhost", "ip6-localhost"}
_EXTRA_WORKERS = 16  # admin, health, reflection, and RPCs refused before the queue
DEFAULT_MAX_MESSAGE_BYTES = 4 << 20  # gRPC's own default; uploads stream in chunks below it
_TOKEN_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F))  # printable ASCII, no space: fits metadata


def bundled_assets() -> Path:
    return Path(str(resources.files("loraplex") / "assets"))


def bundled_model_dir() -> Path:
    return bundled_assets() / "tiny-llama"


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServeConfig:
    engine: "EngineConfig"  # noqa: F821 — loraplex.server.engine.engine.EngineConfig
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = any free port (see LoraplexServer.port)
    metrics_port: int | None = 9090  # None = no metrics endpoint; 0 = any free port
    http_port: int | None = None  # OpenAI-compatible HTTP API; None = off (the CLI's default: 8000); 0 = any free port
    served_model_name: str | None = None  # the base model's id over HTTP; None = the model directory's name
    admin_token: str | None = None  # None = admin API refused, unless insecure_admin
    insecure_admin: bool = False  # admin API without a token; loopback hosts only
    api_tokens: tuple[str, ...] = ()  # () = generation open to all; else one of these (or admin_token)
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key: TLS only
    tls_key: Path | None = None  # PEM private key
    tls_client_ca: Path | None = None  # PEM CA; clients must present a certificate it signed
    max_upload_bytes: int | None = None  # None = the store's default cap
    max_receive_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # larger messages: RESOURCE_EXHAUSTED
    grpc_workers: int = field(default=0)  # 0 = max_running + max_queue + 16
    shutdown_grace_s: float = 30.0
    metrics_max_adapters: int = 100  # adapters with a labelled per-adapter series (the busiest); the rest: "_other"

    def __post_init__(self) -> None:
        object.__setattr__(self, "api_tokens", tuple(self.api_tokens))
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        for name in ("port", "metrics_port", "http_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {value}")
        if self.metrics_max_adapters < 1:
            raise ValueError("metrics_max_adapters must be ≥ 1")
        if self.admin_token is not None and not self.admin_token.strip():
            raise ValueError("admin_token must not be empty (leave it unset to disable the admin API)")
        if self.insecure_admin and self.admin_token is not None:
            raise ValueError("insecure_admin and admin_token exclude each other")
        if self.insecure_admin and not is_loopback(self.host):
            raise ValueError(f"insecure_admin is only allowed on a loopback host, not {self.host!r}")
        if self.grpc_workers < 0:
            raise ValueError(f"grpc_workers must be ≥ 0, got {self.grpc_workers}")
        if self.max_upload_bytes is not None and self.max_upload_bytes <= 0:
            raise ValueError(f"max_upload_bytes must be > 0, got {self.max_upload_bytes}")
        if self.shutdown_grace_s < 0:
            raise ValueError(f"shutdown_grace_s must be ≥ 0, got {self.shutdown_grace_s}")
        for token in self.api_tokens:
            if not isinstance(token, str) or not token or not set(token) <= _TOKEN_CHARS:
                raise ValueError("API tokens must be non-empty printable ASCII without spaces")
        if self.admin_token is not None and self.admin_token in self.api_tokens:
            raise ValueError("an API token must not equal the admin token")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (client certificates) needs tls_cert and tls_key")
        if self.max_receive_message_bytes < 1 << 16:
            raise ValueError(f"max_receive_message_bytes must be ≥ 64 KiB, got {self.max_receive_message_bytes}")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def workers(self) -> int:
        if self.grpc_workers:
            return self.grpc_workers
        return self.engine.max_running + self.engine.max_queue + _EXTRA_WORKERS


def seed_bundled_adapters(adapter_root: Path, bundled: Path | None = None) -> list[str]:
    """Copies the bundled demo adapters into `adapter_root`, each once: a marker file
    remembers what was copied, so an adapter the operator deleted does not come back."""
    bundled = bundled if bundled is not None else bundled_assets() / "adapters"
    adapter_root.mkdir(parents=True, exist_ok=True)
    marker = adapter_root / ".loraplex-seeded"
    seeded = set(marker.read_text().split()) if marker.exists() else set()
    copied = []
    if bundled.is_dir():
        for src in sorted(p for p in bundled.iterdir() if p.is_dir()):
            if src.name in seeded:
                continue
            if not (adapter_root / src.name).exists():
                shutil.copytree(src, adapter_root / src.name)
                copied.append(src.name)
            seeded.add(src.name)
        marker.write_text("".join(f"{name}\n" for name in sorted(seeded)))
    return copied


class LoraplexServer:
    def __init__(self, config: ServeConfig, engine=None):
        self.config = config
        self._engine = engine  # None: built from config.engine in start()
        self.metrics: ServerMetrics | None = None
        self._grpc: grpc.Server | None = None
        self._health: health.HealthServicer | None = None
        self._metrics_http = None
        self._openai = None  # server/http/server.py HttpServer, when http_port is set
        self.service: Service | None = None
        self._port: int | None = None
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> "LoraplexServer":
        """Loads the model (unless an engine was given) and starts serving; not warm yet."""
        from loraplex.adapters.store import AdapterStore

        credentials = None  # read first: a wrong file fails before the model loads
        if self.config.tls:
            credentials = tls.server_credentials(self.config.tls_cert, self.config.tls_key, self.config.tls_client_ca)
        if self._engine is None:
            from loraplex.server.engine.engine import Engine

            self._engine = Engine.from_config(self.config.engine)
        engine = self._engine
        engine.start()
        store_kwargs = {} if self.config.max_upload_bytes is None else {"max_upload_bytes": self.config.max_upload_bytes}
        store = AdapterStore(Path(engine.config.adapter_root), **store_kwargs)
        for leftover in store.remove_leftovers():
            log.info("removed %s left in the adapter root by an interrupted upload", leftover)
        self.metrics = ServerMetrics(engine, max_adapter_series=self.config.metrics_max_adapters)
        self.service = Service(engine, store, self.metrics, served_model_name=self.config.served_model_name)
        access = Access(self.config.admin_token, self.config.api_tokens, self.config.insecure_admin)

        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.config.workers, thread_name_prefix="grpc"),
            interceptors=[  # the first is the outermost
                StatusInterceptor({GENERATION_SERVICE, ADMIN_SERVICE}, self.metrics.count_request),
                AdminAuthInterceptor({ADMIN_SERVICE}, self.config.admin_token, self.config.insecure_admin),
                ClientAuthInterceptor({GENERATION_SERVICE}, self.config.api_tokens, self.config.admin_token),
                UndecodableRequestInterceptor({GENERATION_SERVICE, ADMIN_SERVICE}),
            ],
            options=[("grpc.max_receive_message_length", self.config.max_receive_message_bytes)],
            maximum_concurrent_rpcs=self.config.workers,
        )
        generate_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(self.service), self._grpc)
        admin_pb2_grpc.add_AdapterAdminServicer_to_server(AdapterAdminServicer(self.service), self._grpc)
        self._health = health.HealthServicer(
            experimental_non_blocking=True,
            experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"),
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection(
            (GENERATION_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc
        )
        address = _host_port(self.config.host, self.config.port)
        if credentials is None:
            self._port = self._grpc.add_insecure_port(address)
        else:
            self._port = self._grpc.add_secure_port(address, credentials)
        if self._port == 0:
            raise RuntimeError(f"could not bind gRPC to {address}")
        if self.config.http_port is not None:  # bound before gRPC starts: a taken port fails the start
            from loraplex.server.http.server import HttpServer

            self._openai = HttpServer(self.service, access, self.metrics, self.config)
        self._grpc.start()
        if self._openai is not None:
            self._openai.start()
        if self.config.metrics_port is not None:
            from prometheus_client import start_http_server

            self._metrics_http, _ = start_http_server(self.config.metrics_port, addr=self.config.host, registry=self.metrics.registry)
        log.info("listening on %s (%s; HTTP API port: %s; metrics port: %s); health NOT_SERVING until warm-up", self.target,
                 ("mutual TLS" if self.config.tls_client_ca else "TLS") if self.config.tls else "plaintext", self.http_port,
                 self.metrics_port)  # fmt: skip
        return self

    def warm_up(self) -> None:
        """Runs the engine's warm-up generation, then reports SERVING."""
        self._engine.warmup()
        if not self._stopped.is_set():
            self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def drain(self) -> None:
        """Health NOT_SERVING (HTTP /health 503); new generation requests are refused with
        UNAVAILABLE (HTTP 503)."""
        if self._engine is not None:  # first: once health says NOT_SERVING, requests are refused
            self._engine.drain()
        if self._health is not None:
            self._health.enter_graceful_shutdown()

    def stop(self, grace_s: float | None = None) -> None:
        """Drains, lets running requests finish within grace_s, cancels the rest, closes."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            grace = self.config.shutdown_grace_s if grace_s is None else grace_s
            self.drain()
            if self._engine is not None:
                self._engine.shutdown(grace)
            if self._grpc is not None:
                # Requests are finished or cancelled by now; this lets their last messages out.
                self._grpc.stop(min(grace, 5.0)).wait()
            if self._openai is not None:  # likewise: its streams have ended or are ending
                self._openai.stop(min(grace, 5.0))
            if self._metrics_http is not None:
                self._metrics_http.shutdown()
                self._metrics_http.server_close()
            self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until stop() has finished (True) or timeout passes (False)."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> "LoraplexServer":
        self.start()
        self.warm_up()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- accessors --------------------------------------------------------------------------
    @property
    def engine(self):
        return self._engine

    @property
    def port(self) -> int | None:
        """The bound gRPC port (useful with port 0)."""
        return self._port

    @property
    def target(self) -> str:
        return _host_port(self.config.host, self._port)

    @property
    def metrics_port(self) -> int | None:
        return None if self._metrics_http is None else self._metrics_http.server_port

    @property
    def http_port(self) -> int | None:
        """The bound port of the OpenAI-compatible HTTP API (None: off)."""
        return None if self._openai is None else self._openai.port

    @property
    def http_url(self) -> str | None:
        if self._openai is None:
            return None
        scheme = "https" if self.config.tls else "http"
        return f"{scheme}://{_host_port(self.config.host, self._openai.port)}"

    def _set_health(self, status) -> None:
        for service in ("", GENERATION_SERVICE, ADMIN_SERVICE):
            self._health.set(service, status)
