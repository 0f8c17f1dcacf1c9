"""The engine's prefix-cache and speculative-decoding counters, and the cost per million tokens, as a running
server exports them: on /metrics (equal to the engine's own `EngineStats`), through `GetExpertStats`, and in
`moe-runtime stats` (hit rate, acceptance rate, cost lines)."""

from __future__ import annotations

import json
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from moe_runtime.cli import main
from moe_runtime.telemetry import usd_per_million_tokens

PREFIX = list(range(100, 132))  # two full KV blocks of 16 tokens
# tiny-trained repeats itself on code (the random tiny model's outputs never repeat): prompt lookup (ngram)
# then finds continuations (tests/engine/test_speculative.py).
CODE = ("def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n\n"
        "def fibonacci_list(n):\n")


def _scrape(srv) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _stats(srv, capsys, *flags: str):
    assert main(["stats", "--server", srv.address, *flags]) == 0
    out = capsys.readouterr().out
    return json.loads(out) if "--json" in flags else " ".join(out.split())


@pytest.fixture(scope="module")
def prefix_server(start_server, stub_for, request_for):
    """Prefix caching on (the default), a price set: two requests that share a 32-token prefix."""
    with start_server("telemetry.cost.usd_per_hour=3.6", "telemetry.cost.window_s=86400") as srv:
        stub = stub_for(srv)
        for tail, n in (([7, 8, 9], 5), ([10, 11], 3)):
            resp = stub.Generate(request_for(PREFIX + tail, max_tokens=n), timeout=60)
            assert len(resp.token_ids) == n
        srv.wait_idle()
        yield srv


def test_prefix_cache_hits_on_metrics_and_stats(prefix_server, capsys):
    engine = prefix_server.engine.make_stats()
    assert engine.prefix_cache_hits >= 32  # the second request found both blocks of the shared prefix
    metrics = _scrape(prefix_server)
    assert metrics[("moe_runtime_prefix_cache_hits_total", ())] == engine.prefix_cache_hits
    assert metrics[("moe_runtime_prefix_cache_queries_total", ())] == engine.prefix_cache_queries
    assert metrics[("moe_runtime_spec_proposed_tokens_total", ())] == 0  # speculative decoding is off
    stats = _stats(prefix_server, capsys, "--json")
    rate = engine.prefix_cache_hits / engine.prefix_cache_queries
    assert stats["prefix_cache"] == {"queries": engine.prefix_cache_queries, "hits": engine.prefix_cache_hits,
                                     "hit_rate": pytest.approx(rate)}
    table = _stats(prefix_server, capsys)
    assert (f"prefix cache (since start): {engine.prefix_cache_hits} of {engine.prefix_cache_queries} prompt "
            f"tokens found, hit rate {rate:.2f}") in table
    assert "speculative decoding" not in table


def test_cost_per_million_tokens(prefix_server, capsys):
    """Both requests completed in the window: their usage (37 + 34 prompt, 5 + 3 generated tokens) is what
    the machine's price is spread over, by the one definition the benchmark report uses."""
    stats = _stats(prefix_server, capsys, "--json")
    cost = stats["cost"]
    assert cost["configured"] and cost["usd_per_hour"] == 3.6
    assert (cost["prompt_tokens"], cost["generated_tokens"]) == (2 * 32 + 3 + 2, 5 + 3)
    assert cost["window_s"] > 0
    assert cost["usd_per_million_generated_tokens"] == pytest.approx(usd_per_million_tokens(3.6, cost["window_s"], 8))
    assert cost["usd_per_million_prompt_tokens"] == pytest.approx(usd_per_million_tokens(3.6, cost["window_s"], 69))
    metrics = _scrape(prefix_server)  # a later instant: the window has grown, the tokens have not
    generated = metrics[("moe_runtime_cost_usd_per_million_tokens", (("kind", "generated"),))]
    prompt = metrics[("moe_runtime_cost_usd_per_million_tokens", (("kind", "prompt"),))]
    assert generated >= cost["usd_per_million_generated_tokens"] and generated / prompt == pytest.approx(69 / 8)
    assert metrics[("moe_runtime_cost_usd_per_hour", ())] == 3.6
    assert "cost at $3.6/h over the last" in _stats(prefix_server, capsys)


def test_no_cost_series_without_a_price(start_server, stub_for, request_for):
    with start_server() as srv:
        stub_for(srv).Generate(request_for([5, 6, 7], max_tokens=2), timeout=60)
        srv.wait_idle()
        names = {name for name, _ in _scrape(srv)}
    assert "moe_runtime_cost_usd_per_million_tokens" not in names and "moe_runtime_prefix_cache_hits_total" in names


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    from moe_runtime.presets.tiny_trained import write_tiny_trained

    return write_tiny_trained(tmp_path_factory.mktemp("tiny-trained"))


def test_speculative_counters_on_metrics_and_stats(start_server, stub_for, request_for, capsys, trained_dir):
    with start_server("speculative.method=ngram", "speculative.num_tokens=3", "model.dtype=float32",
                      model_dir=trained_dir) as srv:
        resp = stub_for(srv).Generate(request_for(CODE, max_tokens=24), timeout=60)
        assert len(resp.token_ids) == 24
        srv.wait_idle()
        engine = srv.engine.make_stats()
        metrics = _scrape(srv)
        stats = _stats(srv, capsys, "--json")
        table = _stats(srv, capsys)
    assert engine.spec_proposed_tokens > 0 and engine.spec_verifications > 0
    for name, value in (("proposed_tokens", engine.spec_proposed_tokens),
                        ("accepted_tokens", engine.spec_accepted_tokens),
                        ("verifications", engine.spec_verifications)):
        assert metrics[(f"moe_runtime_spec_{name}_total", ())] == value
        assert stats["speculative"][name] == value
    acceptance = engine.spec_accepted_tokens / engine.spec_proposed_tokens
    assert stats["speculative"]["acceptance_rate"] == pytest.approx(acceptance)
    assert stats["speculative"]["tokens_per_verification"] == pytest.approx(
        1 + engine.spec_accepted_tokens / engine.spec_verifications)
    assert (f"{engine.spec_accepted_tokens} of {engine.spec_proposed_tokens} proposed tokens accepted, "
            f"acceptance rate {acceptance:.2f}") in table
