"""A started LoraplexServer as tests drive it: its engine, a /metrics scrape, waiting for
a condition or an idle engine; and `code_of`, the gRPC status a call ends with."""

from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass
from typing import Callable

import grpc


def code_of(call) -> grpc.StatusCode:
    """Runs `call`; the gRPC status code it failed with, or OK if it succeeded."""
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


@dataclass
class LiveServer:
    server: object  # LoraplexServer, started
    target: str

    @property
    def engine(self):
        return self.server.engine

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def scrape(self) -> dict[tuple[str, tuple], float]:
        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"{what} not reached within {timeout}s: {self.engine.stats()}"
            time.sleep(0.01)

    def wait_idle(self, timeout: float = 15.0) -> None:
        def idle():
            s = self.engine.stats()
            return s.running == 0 and s.queue_depth == 0 and s.kv_blocks_used == 0 and s.adapter_pins == 0

        self.wait_for(idle, timeout, "an idle engine")


class LentEngine:
    """The session's engine lent to another front end: lifecycle calls do nothing;
    `ready` can be overridden (a front end that is warming up)."""

    def __init__(self, engine, ready: bool | None = None):
        self._engine, self._ready = engine, ready

    def __getattr__(self, name):
        return getattr(self._engine, name)

    @property
    def ready(self):
        return self._engine.ready if self._ready is None else self._ready

    def start(self) -> None:
        pass

    def warmup(self, timeout: float = 0.0) -> None:
        pass

    def drain(self) -> None:
        pass

    def shutdown(self, grace_s: float = 0.0) -> None:
        pass
