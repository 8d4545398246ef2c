"""One real loraplex server for the HTTP tests: the bundled tiny model (NF4, CPU) with
gRPC and the OpenAI-compatible HTTP API on loopback, an admin token, the bundled demo
adapters (shout, pirate) in a temporary adapter root. `front_end(**fields)`: another
server on the same engine (tokens, not-ready), so no test loads the model twice.
Tests leave the server as they found it (close what they open, unload what they load).
"""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import loraplex
from live_server import LentEngine, LiveServer

TINY = Path(loraplex.__file__).parent / "assets" / "tiny-llama"
ADMIN_TOKEN = "http-admin-token"
MAX_RUNNING = 8
MAX_QUEUE = 56  # 50 concurrent streams fit (running + waiting)


@dataclasses.dataclass
class HttpLive(LiveServer):
    base_url: str  # http://127.0.0.1:PORT/v1
    adapter_root: Path

    def post(self, path: str, body, token: str | None = None, url: str | None = None) -> tuple[int, dict | str]:
        """(status, parsed JSON body or text) of a POST to the HTTP API."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return _call(urllib.request.Request((url or self.base_url) + path, data=data, method="POST",
                                            headers=_headers(token, {"Content-Type": "application/json"})))  # fmt: skip

    def get(self, path: str, token: str | None = None, url: str | None = None) -> tuple[int, dict | str]:
        return _call(urllib.request.Request((url or self.base_url) + path, headers=_headers(token, {})))


def _headers(token, headers):
    return dict(headers, Authorization=f"Bearer {token}") if token else headers


def _call(request) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            status, raw, kind = r.status, r.read().decode(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        status, raw, kind = e.code, e.read().decode(), e.headers.get("content-type", "")
    return status, json.loads(raw) if kind.startswith("application/json") else raw


@pytest.fixture(scope="session")
def http_live(tmp_path_factory) -> HttpLive:
    from loraplex.server.app import LoraplexServer, ServeConfig, seed_bundled_adapters
    from loraplex.server.engine.config import EngineConfig

    root = tmp_path_factory.mktemp("http-adapter-root")
    seed_bundled_adapters(root)
    engine = EngineConfig(
        model_dir=TINY, adapter_root=root, quantize="nf4", device="cpu", max_batch_tokens=512,
        max_running=MAX_RUNNING, max_queue=MAX_QUEUE, kv_cache_tokens=8192, adapter_slots=4, max_rank=64,
        max_new_tokens=512,
    )  # fmt: skip
    config = ServeConfig(engine=engine, port=0, metrics_port=0, http_port=0, admin_token=ADMIN_TOKEN)
    server = LoraplexServer(config)
    server.start()
    try:
        server.warm_up()
        yield HttpLive(server, server.target, server.http_url + "/v1", root)
    finally:
        server.stop(2.0)


@pytest.fixture
def front_end(http_live):
    """front_end(ready=None, **serve_config_fields) -> a started LoraplexServer on the
    session's engine (its own gRPC and HTTP ports, metrics off); stopped after the test."""
    from loraplex.server.app import LoraplexServer

    started = []

    def make(ready: bool | None = None, **fields):
        fields.setdefault("metrics_port", None)
        config = dataclasses.replace(http_live.server.config, port=0, http_port=0, **fields)
        server = LoraplexServer(config, engine=LentEngine(http_live.engine, ready))
        started.append(server)
        server.start()
        return server

    yield make
    for server in started:
        server.stop(1.0)


@pytest.fixture
def openai_client(http_live):
    import openai

    with openai.OpenAI(base_url=http_live.base_url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c
