"""The benchmark report's math on synthetic timings: percentiles against numpy, TTFT/TPOT/ITL per request,
throughput, goodput under SLOs and cost per million tokens, worked by hand."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moe_runtime.bench.report import RequestResult, cost_per_million, make_report, meets_slo, percentile


@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=50), st.floats(0, 100))
def test_percentile_is_numpys_linear(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-9, abs=1e-6)


def test_percentile_edges():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    with pytest.raises(ValueError, match="q=101"):
        percentile([1.0], 101)


def _result(start, token_times, output_tokens=None, prompt=10, error=None):
    return RequestResult(prompt_tokens=prompt, output_tokens=len(token_times) if output_tokens is None else
                         output_tokens, start_s=start, end_s=(token_times[-1] if token_times else start) + 0.001,
                         token_times=list(token_times), error=error)


def test_per_request_timings():
    r = _result(1.0, [1.1, 1.15, 1.25, 1.30])
    assert r.ttft_s == pytest.approx(0.1)
    assert r.tpot_s == pytest.approx(0.2 / 3)
    assert r.itl_s == pytest.approx([0.05, 0.10, 0.05])
    assert r.e2e_s == pytest.approx(0.301)
    two_per_chunk = _result(0.0, [0.1, 0.2], output_tokens=4)  # chunks of two tokens: TPOT counts tokens
    assert two_per_chunk.tpot_s == pytest.approx(0.1 / 3) and two_per_chunk.itl_s == pytest.approx([0.1])
    assert _result(0.0, [0.5]).tpot_s is None  # one token: no TPOT
    assert not _result(0.0, [], error="UNAVAILABLE: x").ok


def test_report_throughput_latency_goodput_cost():
    results = [
        _result(0.0, [0.10, 0.12, 0.14, 0.16, 0.18], prompt=100),  # TTFT 100 ms, TPOT 20 ms
        _result(0.5, [0.80, 0.85, 0.90, 0.95, 1.00], prompt=100),  # TTFT 300 ms, TPOT 50 ms
        _result(1.0, [1.05, 1.15, 1.25, 1.35, 1.999], prompt=100),  # TTFT 50 ms, TPOT ~237 ms
        _result(1.5, [], error="RESOURCE_EXHAUSTED: queue full"),
    ]
    report = make_report(results, duration_s=2.0, slo_ttft_ms=200, slo_tpot_ms=60, usd_per_hour=3.6)
    assert report["requests"] == {"completed": 3, "failed": 1, "errors": {"RESOURCE_EXHAUSTED: queue full": 1}}
    assert report["tokens"] == {"prompt": 300, "generated": 15}
    assert report["throughput"] == pytest.approx({"requests_per_s": 1.5, "prompt_tokens_per_s": 150.0,
                                                  "generated_tokens_per_s": 7.5, "total_tokens_per_s": 157.5})
    assert report["ttft_ms"]["p50"] == pytest.approx(100.0) and report["ttft_ms"]["mean"] == pytest.approx(150.0)
    assert report["ttft_ms"]["p99"] == pytest.approx(float(np.percentile([100, 300, 50], 99)))
    assert report["tpot_ms"]["p50"] == pytest.approx(50.0)
    assert len([g for r in results for g in r.itl_s]) == 12 and report["itl_ms"]["p50"] == pytest.approx(50.0)
    # Only the first meets both SLOs (the second's TTFT, the third's TPOT miss); failed ones never do.
    assert report["goodput"] == pytest.approx({"slo_ttft_ms": 200, "slo_tpot_ms": 60, "requests": 1,
                                               "requests_per_s": 0.5, "fraction": 0.25})
    # $3.60/h for 2 s = $0.002: per 1M of 15 generated, 300 prompt and 315 tokens.
    assert report["cost"] == pytest.approx({"usd_per_hour": 3.6, "usd_per_million_prompt_tokens": 0.002 / 300 * 1e6,
                                            "usd_per_million_generated_tokens": 0.002 / 15 * 1e6,
                                            "usd_per_million_tokens": 0.002 / 315 * 1e6})
    plain = make_report(results, duration_s=2.0)
    assert plain["goodput"] is None and plain["cost"] is None


def test_slo_rules():
    r = _result(0.0, [0.1, 0.2, 0.3])  # TTFT 100 ms, TPOT 100 ms
    assert meets_slo(r, None, None) and meets_slo(r, 100, 100)
    assert not meets_slo(r, 99, None) and not meets_slo(r, None, 99)
    assert meets_slo(_result(0.0, [0.1]), 150, 1)  # one token: the TPOT SLO does not apply
    assert cost_per_million(3.6, 2.0, 0) is None and cost_per_million(3.6, 3600.0, 10**6) == pytest.approx(3.6)


def test_empty_run():
    report = make_report([], duration_s=0.0, slo_ttft_ms=100, usd_per_hour=1.0)
    assert report["throughput"]["requests_per_s"] == 0.0 and report["ttft_ms"]["p50"] is None
    assert report["goodput"]["fraction"] == 0.0 and report["cost"]["usd_per_million_tokens"] is None
