"""What the operator UI reads about a server: /metrics text (as the server's own Metrics renders it) parsed
into request counts, latency and the loaded models; request rate and latency between two scrapes."""

from __future__ import annotations

from types import SimpleNamespace

from appliance.serve.metrics import Metrics
from appliance.serve.status import parse_metrics, traffic


def served(name: str, version: str, backend: str) -> SimpleNamespace:
    return SimpleNamespace(name=name, version=version, backend=SimpleNamespace(kind=backend), kind="lm")


def test_parse_counts_requests_latency_and_models_but_not_the_scrapes_themselves():
    metrics = Metrics()
    for seconds in (0.02, 0.04, 0.3):
        metrics.observe_request("chat_completions", 200, seconds)
    metrics.observe_request("chat_completions", 401, 0.001, "invalid_api_key")
    metrics.observe_request("metrics", 200, 0.0005)  # the UI's own scrape: not traffic
    sample = parse_metrics(metrics.render([served("qa", "v2", "ort-cpu")], inflight=1, running=1), at=100.0)
    assert sample.requests == 4 and sample.errors == 1 and sample.duration_count == 4
    assert abs(sample.duration_sum - 0.361) < 1e-6
    assert sample.inflight == 1
    assert sample.models == [{"model": "qa", "version": "v2", "backend": "ort-cpu", "kind": "lm"}]
    assert sample.buckets[0.05] == 3 and sample.buckets[float("inf")] == 4

    since_start = traffic(None, sample)
    assert since_start.requests == 4 and since_start.requests_per_s == 0.0  # no earlier scrape: no rate
    assert abs(since_start.mean_latency_ms - 90.25) < 1e-6
    assert since_start.p95_latency_ms == 500.0  # the bucket holding the 95th percentile (0.3 s -> le 0.5)


def test_traffic_between_two_scrapes_is_the_difference():
    metrics = Metrics()
    metrics.observe_request("chat_completions", 200, 0.2)
    first = parse_metrics(metrics.render([], 0, 0), at=10.0)
    for _ in range(10):
        metrics.observe_request("chat_completions", 200, 0.008)
    second = parse_metrics(metrics.render([], 0, 0), at=15.0)
    window = traffic(first, second)
    assert window.requests_per_s == 2.0  # 10 requests in 5 s
    assert abs(window.mean_latency_ms - 8.0) < 1e-6 and window.p95_latency_ms == 10.0
    idle = traffic(second, parse_metrics(metrics.render([], 0, 0), at=20.0))
    assert idle.requests_per_s == 0.0 and idle.mean_latency_ms is None and idle.p95_latency_ms is None


def test_the_monitoring_key_sees_every_loaded_model_a_task_key_only_its_own():
    """The Serve screen's monitoring key may use no model, yet shows what the server has loaded; a key limited to
    a task sees only that task's series (issue 20: /metrics must not list models a key may not use)."""
    from appliance.serve.api_keys import ApiKey
    from appliance.serve.status import MONITOR_SCOPE

    def key(*tasks: str) -> ApiKey:
        return ApiKey("k1", "k", tasks, "active", "2026-12-02T00:00:00Z", "admin", None, None)

    loaded = [served("qa", "v1", "pytorch"), served("xray", "v3", "ort-cpu")]

    def models_seen(api_key: ApiKey) -> list[str]:
        text = Metrics().render(loaded, inflight=0, running=0, allows=api_key.sees_metrics_of)
        return [m["model"] for m in parse_metrics(text, at=1.0).models]

    assert models_seen(key(MONITOR_SCOPE)) == ["qa", "xray"]
    assert not key(MONITOR_SCOPE).allows("qa")  # and it still may not use one
    assert models_seen(key("xray")) == ["xray"]
    assert models_seen(key()) == ["qa", "xray"]
