"""grpc.health.v1 (NOT_SERVING until warm), server reflection (what grpcurl uses), and
the Prometheus endpoint: counters move, engine gauges are there, labels stay bounded."""

from __future__ import annotations

import re
import urllib.request

import grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families


def test_health_flips_to_serving_after_warmup(running, client):
    assert running.health_before_warmup == "NOT_SERVING"
    assert running.engine.ready
    for service in ("", "loraplex.v1.Generation", "loraplex.v1.AdapterAdmin"):
        assert client.health(service) == "SERVING"


def test_reflection_lists_the_services(running):
    with grpc.insecure_channel(running.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"loraplex.v1.Generation", "loraplex.v1.AdapterAdmin", "grpc.health.v1.Health"} <= services
        generate = db.FindFileContainingSymbol("loraplex.v1.Generation")
        assert generate.name == "loraplex/v1/generate.proto"


def scrape(running) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(running.metrics_url, timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_move(running, client):
    before = scrape(running)
    client.generate("Once upon a time", "alpha", max_new_tokens=5, ignore_eos=True)
    list(client.generate_stream("Once upon a time", max_new_tokens=5, ignore_eos=True))
    try:
        client.generate("hi", "no-such-adapter-xyz")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND
    after = scrape(running)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("loraplex_requests_total", frontend="grpc", method="Generate", code="OK") == 1
    assert delta("loraplex_requests_total", frontend="grpc", method="GenerateStream", code="OK") == 1
    assert delta("loraplex_requests_total", frontend="grpc", method="Generate", code="NOT_FOUND") == 1
    assert delta("loraplex_generated_tokens_total") == 10
    assert delta("loraplex_prompt_tokens_total") > 0
    assert delta("loraplex_time_to_first_token_seconds_count") == 2
    assert delta("loraplex_inter_token_latency_seconds_count") == 8
    assert delta("loraplex_adapter_requests_total", adapter="alpha") == 1
    assert delta("loraplex_adapter_requests_total", adapter="_base") == 1
    assert delta("loraplex_adapter_requests_total", adapter="_unknown") == 1
    assert not any("no-such-adapter-xyz" in str(labels) for _, labels in after)  # bounded label set
    assert delta("loraplex_engine_steps_total") >= 5
    s = running.engine.stats()
    for gauge in ("loraplex_queue_depth", "loraplex_running_requests", "loraplex_adapters_resident", "loraplex_adapter_pages_free"):
        assert (gauge, ()) in after
    assert after[("loraplex_kv_blocks_used", ())] + after[("loraplex_kv_blocks_free", ())] == s.kv_blocks_total
    assert after[("loraplex_adapters_known", ())] == s.adapters_known
    assert after[("loraplex_engine_ready", ())] == 1
    for counter in ("loraplex_adapter_loads_total", "loraplex_adapter_evictions_total", "loraplex_adapter_load_failures_total"):
        assert (counter, ()) in after


def test_admin_calls_are_counted(running, admin, client):
    from loraplex.client import LoraplexClient

    before = scrape(running)
    admin.list_adapters()
    with LoraplexClient(running.target, timeout=10) as anonymous:
        try:
            anonymous.list_adapters()
        except grpc.RpcError:
            pass
    after = scrape(running)
    key = lambda code: ("loraplex_requests_total", (("code", code), ("frontend", "grpc"), ("method", "ListAdapters")))  # noqa: E731
    assert after[key("OK")] - before.get(key("OK"), 0) == 1
    assert after[key("UNAUTHENTICATED")] - before.get(key("UNAUTHENTICATED"), 0) == 1


def test_per_adapter_series_are_the_busiest_and_the_rest_is_other():
    from prometheus_client import CollectorRegistry, generate_latest

    from loraplex.server.metrics import AdapterRequests

    series = AdapterRequests(max_series=3)
    registry = CollectorRegistry()
    registry.register(series)
    for i, n in enumerate((5, 1, 4, 2, 3)):
        for _ in range(n):
            series.count(f"a{i}")
    series.count("_base")
    series.count("_unknown")
    text = generate_latest(registry).decode()
    got = dict(re.findall(r'^loraplex_adapter_requests_total\{adapter="([^"]+)"\} (\S+)$', text, re.M))
    assert got == {"a0": "5.0", "a2": "4.0", "a4": "3.0", "_other": "3.0", "_base": "1.0", "_unknown": "1.0"}
    series.forget("a0")
    got = dict(re.findall(r'^loraplex_adapter_requests_total\{adapter="([^"]+)"\} (\S+)$', generate_latest(registry).decode(), re.M))
    assert got == {"a2": "4.0", "a4": "3.0", "a3": "2.0", "_other": "1.0", "_base": "1.0", "_unknown": "1.0"}
