"""`/metrics` parsed with the Prometheus parser; router counts add up to layers x top-k x tokens computed;
`GetExpertStats` and `moe-runtime stats` agree with them."""

from __future__ import annotations

import json
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from moe_runtime.cli import main
from moe_runtime.cluster.expert_load import parse_stats
from moe_runtime.server.metrics import TelemetryCollector

LAYERS, EXPERTS, TOP_K = 2, 8, 2
REQUESTS = ((5, 7), (12, 3), (1, 9))  # (prompt tokens, max_tokens), run one after another


@pytest.fixture(scope="module")
def server(start_server, stub_for, request_for):
    with start_server("telemetry.per_expert_metrics=true") as srv:
        stub = stub_for(srv)
        for i, (p, n) in enumerate(REQUESTS):
            resp = stub.Generate(request_for(list(range(3 + i, 3 + i + p)), max_tokens=n, ignore_eos=True), timeout=30)
            assert len(resp.token_ids) == n
        srv.wait_idle()
        yield srv


def _scrape(url: str) -> dict[str, list]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _value(samples, name: str, **labels) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_router_counts_add_up(server):
    families = _scrape(server.metrics_url)
    # Each request runs its prompt and all but its last sampled token through the model.
    tokens = sum(p + n - 1 for p, n in REQUESTS)
    computed = families["moe_runtime_tokens_computed"]
    assert _value(computed, "moe_runtime_tokens_computed_total") == tokens
    routed = families["moe_runtime_router_tokens"]
    for layer in range(LAYERS):
        assert _value(routed, "moe_runtime_router_tokens_total", layer=str(layer)) == TOP_K * tokens
    per_expert = families["moe_runtime_expert_tokens"]
    assert len(per_expert) == LAYERS * EXPERTS
    for layer in range(LAYERS):
        assert _value(per_expert, "moe_runtime_expert_tokens_total", layer=str(layer)) == TOP_K * tokens


def test_metric_names_labels_and_histograms(server):
    families = _scrape(server.metrics_url)
    assert all(name.startswith("moe_runtime_") for name in families)
    samples = [s for ss in families.values() for s in ss]
    assert not [s.name for s in samples if s.name.endswith("_created")]
    assert {k for s in samples for k in s.labels} <= {"layer", "expert", "reason", "le"}
    assert _value(families["moe_runtime_time_to_first_token_seconds"],
                  "moe_runtime_time_to_first_token_seconds_count") == len(REQUESTS)
    assert _value(families["moe_runtime_requests_finished"], "moe_runtime_requests_finished_total",
                  reason="length") == len(REQUESTS)
    assert _value(families["moe_runtime_kv_blocks_used"], "moe_runtime_kv_blocks_used") == 0
    total = _value(families["moe_runtime_kv_blocks_total"], "moe_runtime_kv_blocks_total")
    assert _value(families["moe_runtime_kv_blocks_free"], "moe_runtime_kv_blocks_free") == total > 0
    for layer in range(LAYERS):
        assert _value(families["moe_runtime_expert_imbalance"], "moe_runtime_expert_imbalance", layer=str(layer)) >= 1
        assert 0 < _value(families["moe_runtime_router_entropy"], "moe_runtime_router_entropy", layer=str(layer)) <= 1


def test_per_expert_series_only_when_enabled(server):
    registry = CollectorRegistry()
    registry.register(TelemetryCollector(server.app.telemetry, per_expert=False))
    names = {f.name for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert "moe_runtime_router_tokens" in names
    assert not {"moe_runtime_expert_tokens", "moe_runtime_expert_window_tokens"} & names


def test_stats_cli_json_matches_metrics(server, capsys):
    assert main(["stats", "--server", server.address, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["layers"], stats["experts"], stats["top_k"]) == (LAYERS, EXPERTS, TOP_K)
    tokens = sum(p + n - 1 for p, n in REQUESTS)
    assert stats["tokens_processed"] == tokens
    assert [sum(row) for row in stats["tokens_per_expert"]] == [TOP_K * tokens] * LAYERS
    assert len(stats["imbalance"]) == len(stats["entropy"]) == LAYERS
    assert stats["time_to_first_token"]["count"] == len(REQUESTS)
    assert parse_stats(stats).shape == (LAYERS, EXPERTS)  # the placement planner reads it as is


def test_stats_cli_table(server, capsys):
    assert main(["stats", "--server", server.address]) == 0
    out = capsys.readouterr().out
    assert "max/mean" in out and "entropy" in out and "e7" in out


def test_stats_cli_unreachable_server_is_one_line(capsys):
    assert main(["stats", "--server", "127.0.0.1:1", "--timeout", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("moe-runtime stats: error: UNAVAILABLE") and "\n" not in err
