"""The Grafana dashboard (cluster/deploy/grafana/moe-runtime.json) and the Prometheus alert rules
(cluster/deploy/prometheus/alerts.yaml) name only metrics a running server exports, their queries parse as
PromQL, and `promtool check rules` accepts the rules.

Metric names are taken from the parsed queries (every vector selector), not by pattern, so a renamed metric
or a typo in a panel fails here. The server is the real one (tests/server/conftest.py) with per-expert
series and a machine price on, after two requests that share a prefix. The rank families are exported only
with the Ray executor: the test hands the server's telemetry one `RankStats` report through the hook the Ray
executor uses (`observe_step`), so that they are in the scrape; tests/cluster/test_ray_server.py checks the
same families on a real Ray server.

PromQL parsing uses the `promql-parser` package (Prometheus' grammar and function list, in Rust). promtool
itself is not on PyPI: `test_promtool_check_and_test_rules` runs it (`check rules`, and the rules' unit tests
in alerts_test.yaml) when it is on PATH (Debian's `prometheus` package ships it) or named by $PROMTOOL, and
is skipped otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from moe_runtime.telemetry import RankStats

promql = pytest.importorskip("promql_parser", reason="pip install promql-parser (the dev extra)")

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "cluster/deploy/grafana/moe-runtime.json"
ALERTS = ROOT / "cluster/deploy/prometheus/alerts.yaml"
ALERTS_TEST = ROOT / "cluster/deploy/prometheus/alerts_test.yaml"
# Series Prometheus makes itself, per scrape target; no server exports them.
PROMETHEUS_OWN = {"up"}
# Grafana's variables, replaced by a value of the same kind before parsing.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
# What the issue asks the dashboard to show, by the metric that shows it.
DASHBOARD_MUST_SHOW = {
    "moe_runtime_generation_tokens_total": "tokens/s",
    "moe_runtime_time_to_first_token_seconds_bucket": "TTFT percentiles",
    "moe_runtime_time_per_output_token_seconds_bucket": "inter-token latency percentiles",
    "moe_runtime_requests_waiting": "queue depth",
    "moe_runtime_kv_blocks_used": "KV usage",
    "moe_runtime_preemptions_total": "preemptions",
    "moe_runtime_expert_window_tokens": "per-(layer, expert) load heatmap",
    "moe_runtime_rank_imbalance": "rank imbalance",
    "moe_runtime_expert_cache_hits_total": "offload hit rate",
    "moe_runtime_expert_cache_bytes_moved_total": "bytes moved",
    "moe_runtime_serving": "worker health",
    "moe_runtime_worker_restarts_total": "worker health (Ray)",
    "moe_runtime_cost_usd_per_million_tokens": "cost per million tokens",
    "moe_runtime_prefix_cache_hits_total": "prefix cache hit rate",
    "moe_runtime_spec_accepted_tokens_total": "speculative acceptance rate",
}


def metric_names(expr: str) -> set[str]:
    """The metric names of every vector selector in a PromQL expression (ValueError if it does not parse)."""
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    names: set[str] = set()

    def visit(node) -> None:
        if isinstance(node, promql.VectorSelector):
            name = node.name or next((m.value for m in node.matchers.matchers if m.name == "__name__"), None)
            assert name, f"a selector without a metric name in {expr!r}"
            names.add(name)

    promql.walk(promql.parse(expr), visit)
    return names


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every `label_values(...)` variable query."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", var["query"]["query"])
            assert m, f"variable {var['name']}: expected label_values(SELECTOR, LABEL), got {var['query']!r}"
            out.append((f"variable {var['name']}", m.group(1)))
    return out


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def exported(start_server, stub_for, request_for) -> set[str]:
    """Sample names on a running server's /metrics, after two requests sharing a 32-token prefix."""
    with start_server("telemetry.per_expert_metrics=true", "telemetry.cost.usd_per_hour=3.6",
                      "telemetry.cost.window_s=86400") as srv:
        stub = stub_for(srv)
        prefix = list(range(100, 132))  # two full KV blocks of 16
        for tail in ([7, 8, 9], [10, 11]):
            stub.Generate(request_for(prefix + tail, max_tokens=4), timeout=60)
        srv.wait_idle()
        tel = srv.app.telemetry
        shares = [[[1.0, 0.0] if e % 2 == 0 else [0.0, 1.0] for e in range(tel.num_experts)]
                  for _ in range(tel.num_layers)]
        tel.observe_step(RankStats(shares=shares, expert_bytes=(1024, 1024), step_s=(0.01, 0.012),
                                   collective_s=(0.002, 0.001), restarts=1))
        text = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_dashboard_names_only_exported_metrics(exported):
    named: dict[str, str] = {}
    for where, expr in dashboard_queries():
        try:
            names = metric_names(expr)
        except ValueError as e:
            pytest.fail(f"{where}: not PromQL ({e}): {expr}")
        named.update((name, where) for name in names)
    missing = {name: where for name, where in named.items() if name not in exported | PROMETHEUS_OWN}
    assert not missing, f"the dashboard names metrics the server does not export: {missing}"
    not_shown = {name: what for name, what in DASHBOARD_MUST_SHOW.items() if name not in named}
    assert not not_shown, f"the dashboard shows nothing of: {not_shown}"


def test_alert_rules_name_only_exported_metrics(exported):
    rules = alert_rules()
    assert len(rules) >= 10
    missing = {}
    for rule in rules:
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        missing.update({name: rule["alert"] for name in names - exported - PROMETHEUS_OWN})
    assert not missing, f"alert rules name metrics the server does not export: {missing}"


def test_alert_rules_structure():
    """What promtool checks, and what an on-call reader needs: unique names, a severity, a summary and a
    description, a valid `for` duration, and templates that only use the labels the expression keeps."""
    doc = yaml.safe_load(ALERTS.read_text())
    assert set(doc) == {"groups"}
    groups = [g["name"] for g in doc["groups"]]
    assert len(groups) == len(set(groups)), groups
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names)), names
    for rule in alert_rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"MoeRuntime[A-Z]\w+", rule["alert"]), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
        if "for" in rule:
            assert promql.parse_duration(rule["for"]).total_seconds() > 0, rule["alert"]
        for text in rule["annotations"].values():
            for label in re.findall(r"\$labels\.(\w+)", text):
                assert label == "instance", f"{rule['alert']}: annotation uses $labels.{label}"


def test_dashboard_structure():
    """Importable as is: a datasource variable every panel uses, unique panel ids, a grid position each."""
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "moe-runtime" and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"] and panel["description"], panel["title"]


def test_promtool_check_and_test_rules():
    """promtool's own check, then the rules' unit tests (alerts_test.yaml: alerts fire after their `for:`
    with their labels and rendered annotations, and not before)."""
    promtool = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found (not on PyPI; Debian: apt-get install prometheus, or set $PROMTOOL)")
    result = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout
    result = subprocess.run([promtool, "test", "rules", str(ALERTS_TEST)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
