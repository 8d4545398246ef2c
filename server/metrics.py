"""Prometheus metrics of one server instance. Nothing is registered at import: each
`ServerMetrics` owns its CollectorRegistry, so two servers in one process (tests) do not
share series.

Two sources:
- observed by the front ends: requests by front end ("grpc", "http"), method and status
  code (gRPC's code name, HTTP's status number); and, through the service (service.py)
  the same for both front ends, prompt and generated tokens, time to first token and
  inter-token latency (from the engine's event times), requests per adapter;
- read from `engine.stats()` at scrape time by `EngineCollector`: queue depth, running
  batch size, KV blocks used/free, adapters known/resident, and the engine's cumulative
  counters (adapter loads, evictions, load failures, steps).

The per-adapter counter is bounded: its label is the adapter id only for adapters the
adapter manager knows ("_base" for none, "_mixture" for every per-request mixture,
whatever its parts, "_unknown" for everything else), at most
`max_adapter_series` ids get a series of their own (the busiest, chosen at each scrape)
and the rest are summed under "_other", and an adapter's series is dropped when it is
unloaded.

gRPC's StatusInterceptor (server/grpc/status.py) and HTTP's request counter
(server/http/app.py) call `count_request`. Nothing here imports grpc or FastAPI.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# Tiny models on CPU produce tokens in ~1 ms; large ones on a busy GPU in ~100 ms.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)

# Adapter ids start with a letter or digit (adapters/store.py), so these never collide.
BASE_LABEL = "_base"
UNKNOWN_LABEL = "_unknown"
OTHER_LABEL = "_other"
MIXTURE_LABEL = "_mixture"  # every mixture: no series per combination of adapters
FIXED_LABELS = (BASE_LABEL, MIXTURE_LABEL, UNKNOWN_LABEL)


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
            ("loraplex_adapters_known", "Adapters registered with the adapter manager", s.adapters_known),
            ("loraplex_adapters_resident", "Adapters resident in the device adapter pool", s.adapters_resident),
            ("loraplex_adapters_host_cached", "Adapters staged in the host cache", s.adapters_host_cached),
            ("loraplex_adapter_pages_used", "Rank pages (16 rank rows of one target module) held by resident adapters", s.adapter_pages_used),
            ("loraplex_adapter_pages_free", "Rank pages free in the device adapter pool", s.adapter_pages_total - s.adapter_pages_used),
            ("loraplex_cuda_graph_buckets", "Decode batch-size buckets captured as CUDA graphs (0: eager)", s.cuda_graph_buckets),
            ("loraplex_cuda_graph_capture_seconds", "Time the CUDA graph capture took at start", s.cuda_graph_capture_seconds),
            ("loraplex_cuda_graph_bytes", "Device memory of the captured CUDA graphs", s.cuda_graph_bytes),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = (
            ("loraplex_adapter_loads", "Adapter loads into the device pool", s.adapter_loads),
            ("loraplex_adapter_evictions", "Adapter evictions from the device pool", s.adapter_evictions),
            ("loraplex_adapter_load_failures", "Adapter loads that failed", s.adapter_load_failures),
            ("loraplex_engine_steps", "Engine steps run", s.steps),
            ("loraplex_cuda_graph_replays", "Decode steps run by CUDA graph replay", s.cuda_graph_replays),
        )
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    """The registry of one server and the instruments its servicers observe."""

    def __init__(self, engine=None, max_adapter_series: int = 100):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "loraplex_requests", "Requests by front end, method and final status code", ["frontend", "method", "code"], registry=r
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
        self.adapter_requests = AdapterRequests(max_adapter_series)
        r.register(self.adapter_requests)
        if engine is not None:
            r.register(EngineCollector(engine))

    def count_request(self, method: str, code: str, frontend: str = "grpc") -> None:
        self.requests.labels(frontend=frontend, method=method, code=code).inc()

    def count_adapter_request(self, adapter_id: str | None, known: bool) -> None:
        self.adapter_requests.count(BASE_LABEL if not adapter_id else (adapter_id if known else UNKNOWN_LABEL))

    def count_mixture_request(self) -> None:
        self.adapter_requests.count(MIXTURE_LABEL)

    def forget_adapter(self, adapter_id: str) -> None:
        """Drops an unloaded adapter's series so the label set tracks the registered adapters."""
        self.adapter_requests.forget(adapter_id)

    def observe_finish(self, prompt_tokens: int, generated_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(generated_tokens)


class AdapterRequests(Collector):
    """loraplex_adapter_requests_total{adapter}: the `max_series` busiest adapter ids by
    name, the others summed under "_other" ("_base", "_mixture" and "_unknown" always by name)."""

    def __init__(self, max_series: int):
        if max_series < 1:
            raise ValueError("max_adapter_series must be ≥ 1")
        self.max_series = max_series
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def count(self, label: str) -> None:
        with self._lock:
            self._counts[label] = self._counts.get(label, 0) + 1

    def forget(self, adapter_id: str) -> None:
        if adapter_id not in FIXED_LABELS:
            with self._lock:
                self._counts.pop(adapter_id, None)

    def describe(self):
        return []

    def collect(self):
        with self._lock:
            counts = dict(self._counts)
        fixed = {k: counts.pop(k) for k in FIXED_LABELS if k in counts}
        busiest = sorted(counts, key=lambda k: (-counts[k], k))[: self.max_series]
        family = CounterMetricFamily(
            "loraplex_adapter_requests",
            f'Generation requests per adapter ("{BASE_LABEL}" = none, "{MIXTURE_LABEL}" = a mixture of adapters, '
            f'"{UNKNOWN_LABEL}" = not registered, '
            f'"{OTHER_LABEL}" = past the {self.max_series} busiest)',
            labels=["adapter"],
        )
        for label in [*fixed, *busiest]:
            family.add_metric([label], fixed.get(label, counts.get(label)))
        rest = sum(v for k, v in counts.items() if k not in busiest)
        if rest:
            family.add_metric([OTHER_LABEL], rest)
        yield family
