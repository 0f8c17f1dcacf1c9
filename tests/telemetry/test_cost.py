"""Cost per million tokens (moe_runtime/telemetry/cost.py): the sliding window on a driven clock, which
requests count, the config's validation, and the benchmark report computing the same figure from the same
definition."""

from __future__ import annotations

import pytest

from moe_runtime.bench.report import RequestResult, make_report
from moe_runtime.config import load_config
from moe_runtime.errors import ConfigError
from moe_runtime.telemetry import CostWindow, Telemetry, usd_per_million_tokens


def test_definition():
    # $3.60/h for 10 s is $0.01; over 500 tokens that is $20 per million.
    assert usd_per_million_tokens(3.6, 10, 500) == pytest.approx(20.0)
    assert usd_per_million_tokens(3.6, 10, 0) is None and usd_per_million_tokens(3.6, 0, 5) is None


def test_window_slides_and_idle_time_counts():
    w = CostWindow(usd_per_hour=3.6, window_s=100, now=1000.0)
    w.add(400, 50, now=1010.0)
    # 10 s since start: the window is 10 s long so far.
    assert w.span_s(1010.0) == 10.0
    assert w.usd_per_million(1010.0) == pytest.approx({"prompt": 0.01 / 400 * 1e6, "generated": 0.01 / 50 * 1e6})
    w.add(600, 150, now=1090.0)
    # 90 s of wall time, the idle 80 s included, over both requests.
    assert w.tokens(1090.0) == (1000, 200)
    assert w.usd_per_million(1090.0)["generated"] == pytest.approx(3.6 * 90 / 3600 / 200 * 1e6)
    # At 1150 the window is [1050, 1150]: the first request has left it, the span is capped at 100 s.
    assert w.tokens(1150.0) == (600, 150) and w.span_s(1150.0) == 100
    assert w.usd_per_million(1150.0)["prompt"] == pytest.approx(3.6 * 100 / 3600 / 600 * 1e6)
    # Nothing completed in the last 100 s: undefined, not 0 or infinity.
    assert w.usd_per_million(1200.0) == {"prompt": None, "generated": None}


def test_window_memory_is_bounded():
    w = CostWindow(usd_per_hour=1.0, window_s=60, now=0.0)
    for i in range(10_000):
        w.add(1, 1, now=i * 0.05)  # 20 requests a second for 500 s
    assert len(w._buckets) <= 301
    prompt, generated = w.tokens(500.0)
    assert 1180 <= prompt <= 1220 and prompt == generated  # 60 s x 20/s, to within a bucket's width


def test_only_completed_requests_count():
    now = [0.0]
    t = Telemetry(num_layers=1, num_experts=2, top_k=1, usd_per_hour=7.2, cost_window_s=60, clock=lambda: now[0])
    now[0] = 30.0
    t.observe_request("length", 0.0, 0.1, 1.0, num_output_tokens=100, num_prompt_tokens=20)
    t.observe_request("eos", 0.0, 0.1, 1.0, num_output_tokens=50, num_prompt_tokens=10)
    t.observe_request("abort", 0.0, 0.1, 1.0, num_output_tokens=70, num_prompt_tokens=10)
    t.observe_request("resource_exhausted")
    cost = t.snapshot().cost
    assert cost.configured and (cost.prompt_tokens, cost.generated_tokens) == (30, 150)
    assert cost.window_s == 30.0
    assert cost.usd_per_million_generated_tokens == pytest.approx(7.2 * 30 / 3600 / 150 * 1e6)
    assert not Telemetry(1, 2, 1).snapshot().cost.configured


def test_benchmark_and_server_agree():
    """The same requests over the same seconds give the same dollars in the report and in the window."""
    results = [RequestResult(prompt_tokens=p, output_tokens=g, start_s=0.0, end_s=20.0, token_times=[1.0, 20.0])
               for p, g in ((128, 64), (256, 32))]
    report = make_report(results, duration_s=20.0, usd_per_hour=2.5)
    w = CostWindow(usd_per_hour=2.5, window_s=300, now=0.0)
    for r in results:
        w.add(r.prompt_tokens, r.output_tokens, now=20.0)
    server = w.usd_per_million(20.0)
    assert report["cost"]["usd_per_million_generated_tokens"] == pytest.approx(server["generated"])
    assert report["cost"]["usd_per_million_prompt_tokens"] == pytest.approx(server["prompt"])


@pytest.mark.parametrize("value,problem", [
    ("-1", "telemetry.cost.usd_per_hour=-1: not a finite number >= 0"),
    ("abc", "telemetry.cost.usd_per_hour='abc': not a number"),
    ("true", "telemetry.cost.usd_per_hour=True: not a number"),
    (".nan", "not a finite number >= 0"),
    ("[1]", "not a number"),
])
def test_bad_price_names_field_value_and_allowed(value, problem):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[f"telemetry.cost.usd_per_hour={value}"])
    assert problem in str(e.value) and "allowed: a number of US dollars per hour >= 0" in str(e.value)


def test_price_and_window_accepted():
    cfg = load_config(overrides=["telemetry.cost.usd_per_hour=2.5", "telemetry.cost.window_s=60"])
    assert (cfg.telemetry.cost.usd_per_hour, cfg.telemetry.cost.window_s) == (2.5, 60.0)
    assert load_config().telemetry.cost.usd_per_hour is None
    with pytest.raises(ConfigError, match=r"telemetry\.cost\.window_s=0"):
        load_config(overrides=["telemetry.cost.window_s=0"])
    with pytest.raises(ConfigError, match=r"telemetry\.cost\.price: unknown key; allowed: \['usd_per_hour', 'window_s'\]"):
        load_config(overrides=["telemetry.cost.price=1"])
