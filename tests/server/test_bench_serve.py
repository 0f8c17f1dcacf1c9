"""`moe-runtime bench serve --json` end to end against a real tiny server, over gRPC and over HTTP: every
request completes with the asked lengths, the shared prefix hits the server's prefix cache, and the report
carries throughput, percentiles, goodput and cost."""

from __future__ import annotations

import json

import pytest

from moe_runtime.cli import main

TOKEN = "bench-token"


@pytest.fixture(scope="module")
def server(start_server):
    with start_server("server.http_port=0", "engine.max_num_seqs=8", auth_token=TOKEN) as srv:
        yield srv


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bench_serve_json(server, protocol, monkeypatch, capsys):
    monkeypatch.setenv("MOE_RUNTIME_AUTH_TOKEN", TOKEN)
    address = server.address if protocol == "grpc" else f"127.0.0.1:{server.app.http_port}"
    hits = server.engine.make_stats().prefix_cache_hits
    load = ["--concurrency", "3"] if protocol == "grpc" else ["--rate", "50"]
    rc = main(["bench", "serve", "--server", address, "--protocol", protocol, *load, "--num-requests", "9",
               "--prompt-len", "uniform:4:12", "--output-len", "fixed:6", "--shared-prefix-tokens", "32",
               "--warmup", "1", "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000", "--usd-per-hour", "2", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0, report["requests"]
    assert report["requests"] == {"completed": 9, "failed": 0, "errors": {}}
    assert report["tokens"]["generated"] == 54 and 9 * 36 <= report["tokens"]["prompt"] <= 9 * 44
    assert report["throughput"]["generated_tokens_per_s"] > 0 and report["duration_s"] > 0
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        s = report[key]
        assert 0 < s["p50"] <= s["p90"] <= s["p99"], (key, s)
    assert report["goodput"]["requests"] == 9 and report["goodput"]["fraction"] == 1.0
    assert report["cost"]["usd_per_million_generated_tokens"] == pytest.approx(
        2 * report["duration_s"] / 3600 / 54 * 1e6)
    assert report["config"]["protocol"] == protocol and report["config"]["shared_prefix_tokens"] == 32
    # The 32 shared tokens are two full KV blocks: the warm-up request shares them and has finished before the
    # measured ones start, so all nine reuse them, however the concurrent ones are batched.
    assert server.engine.make_stats().prefix_cache_hits >= hits + 9 * 32
    assert server.wait_idle().kv_blocks_used == 0


def test_bench_serve_refused_is_one_clear_line(server, monkeypatch, capsys):
    monkeypatch.setenv("MOE_RUNTIME_AUTH_TOKEN", "wrong")
    rc = main(["bench", "serve", "--server", server.address, "--concurrency", "1", "--num-requests", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("moe-runtime bench: error: --server") and "UNAUTHENTICATED" in err
    rc = main(["bench", "serve", "--server", f"127.0.0.1:{server.app.http_port}", "--protocol", "http",
               "--concurrency", "1", "--num-requests", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "GET /v1/models answered 401: authorization token is wrong" in err
