"""Prometheus metrics of one server instance. Nothing is registered at import: each
`ServerMetrics` owns its CollectorRegistry, so two servers in one process (tests) do not
share series.

Two sources:
- observed by the servicers: requests by method and status code, prompt and generated
  tokens, time to first token, inter-token latency, requests per adapter;
- read from `engine.stats()` at scrape time by `EngineCollector`: queue depth, running
  batch size, KV blocks used/free, adapters known/resident, and the engine's cumulative
  counters (adapter loads, evictions, load failures, steps).

The per-adapter counter is bounded: its label is the adapter id only for adapters the
catalog knows ("_base" for none, "_unknown" for everything else), and an adapter's
series is dropped when it is unloaded.

`StatusInterceptor` reports every RPC of the given services by method and final code.
"""

from __future__ import annotations

import threading
from typing import Callable

import grpc

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from loraplex.server.auth import rewrap_handler, service_of

# Tiny models on CPU produce tokens in ~1 ms; large ones on a busy GPU in ~100 ms.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)

# Adapter ids start with a letter or digit (adapters/store.py), so these never collide.
BASE_LABEL = "_base"
UNKNOWN_LABEL = "_unknown"


class EngineCollector(Collector):
    """Reads engine.stats() once per scrape."""

    def __init__(self, engine):
        self._engine = engine

    def describe(self):
        return []  # collected lazily; no describe-time call into the engine

    def collect(self):
        s = self._engine.stats()
        gauges = (
            ("loraplex_engine_ready", "1 once the model is loaded and warmed up", float(bool(self._engine.ready))),
            ("loraplex_queue_depth", "Requests waiting to be scheduled", s.queue_depth),
            ("loraplex_queue_capacity", "Maximum waiting requests before RESOURCE_EXHAUSTED", s.max_queue),
            ("loraplex_running_requests", "Requests in the running batch", s.running),
            ("loraplex_kv_blocks_used", "KV cache blocks in use", s.kv_blocks_used),
            ("loraplex_kv_blocks_free", "KV cache blocks free", s.kv_blocks_total - s.kv_blocks_used),
            ("loraplex_adapters_known", "Adapters registered in the catalog", s.adapters_known),
            ("loraplex_adapters_resident", "Adapters resident in the device adapter pool", s.adapters_resident),
            ("loraplex_adapter_pages_used", "Rank pages (16 rank rows of one target module) held by resident adapters", s.adapter_pages_used),
            ("loraplex_adapter_pages_free", "Rank pages free in the device adapter pool", s.adapter_pages_total - s.adapter_pages_used),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = (
            ("loraplex_adapter_loads", "Adapter loads into the device pool", s.adapter_loads),
            ("loraplex_adapter_evictions", "Adapter evictions from the device pool", s.adapter_evictions),
            ("loraplex_adapter_load_failures", "Adapter loads that failed", s.adapter_load_failures),
            ("loraplex_engine_steps", "Engine steps run", s.steps),
        )
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    """The registry of one server and the instruments its servicers observe."""

    def __init__(self, engine=None):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "loraplex_requests", "RPCs by method and final status code", ["method", "code"], registry=r
        )
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("loraplex_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "loraplex_time_to_first_token_seconds",
            "From the server receiving a request to its first generated token",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "loraplex_inter_token_latency_seconds",
            "Time between consecutive token events of one request",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.adapter_requests = Counter(
            "loraplex_adapter_requests",
            f'Generation requests per adapter ("{BASE_LABEL}" = none, "{UNKNOWN_LABEL}" = not registered)',
            ["adapter"],
            registry=r,
        )
        self._adapter_lock = threading.Lock()
        if engine is not None:
            r.register(EngineCollector(engine))

    def count_request(self, method: str, code: str) -> None:
        self.requests.labels(method=method, code=code).inc()

    def count_adapter_request(self, adapter_id: str | None, known: bool) -> None:
        label = BASE_LABEL if not adapter_id else (adapter_id if known else UNKNOWN_LABEL)
        with self._adapter_lock:
            self.adapter_requests.labels(adapter=label).inc()

    def forget_adapter(self, adapter_id: str) -> None:
        """Drops an unloaded adapter's series so the label set tracks the catalog."""
        if adapter_id in (BASE_LABEL, UNKNOWN_LABEL):
            return
        with self._adapter_lock:
            try:
                self.adapter_requests.remove(adapter_id)
            except KeyError:
                pass

    def observe_finish(self, prompt_tokens: int, generated_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(generated_tokens)


class StatusInterceptor(grpc.ServerInterceptor):
    """Calls record(method_name, code_name) once per RPC when it ends."""

    def __init__(self, services: set[str], record: Callable[[str, str], None]):
        self._services = frozenset(services)
        self._record = record

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or service_of(method) not in self._services:
            return handler
        name = method.rsplit("/", 1)[-1]
        record = self._record

        def final_code(context, failed: bool) -> str:
            code = context.code()
            if code is not None:
                return code.name
            if not context.is_active():
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:
                    return "DEADLINE_EXCEEDED"
                return "CANCELLED"
            return "UNKNOWN" if failed else "OK"

        def wrap(behavior, streaming_response):
            if streaming_response:

                def stream_behavior(request_or_iterator, context):
                    failed = True
                    try:
                        yield from behavior(request_or_iterator, context)
                        failed = False
                    finally:
                        record(name, final_code(context, failed))

                return stream_behavior

            def unary_behavior(request_or_iterator, context):
                failed = True
                try:
                    response = behavior(request_or_iterator, context)
                    failed = False
                    return response
                finally:
                    record(name, final_code(context, failed))

            return unary_behavior

        return rewrap_handler(handler, wrap)
