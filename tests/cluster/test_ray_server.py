"""The Ray executor behind a real gRPC server (`executor: ray`, 2 workers, fake GPUs, free loopback ports):
live rebalancing through `moe-runtime apply-placement` mid-stream (one log line per call, accepted or
rejected, by the caller's address), the per-rank stats view (placement, step times, expert bytes) in
`GetExpertStats` and `/metrics`, and a worker killed mid-stream (UNAVAILABLE within seconds, health
NOT_SERVING, rebuild, SERVING, same tokens, worker_restarts counted).

One Ray cluster and one Ray server for the module; the local-executor server only checks the refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from moe_runtime import cli
from moe_runtime.cluster.planner import round_robin
from moe_runtime.config import load_config
from moe_runtime.server.app import ServerApp
from moe_runtime.v1 import generation_pb2 as pb
from moe_runtime.v1 import generation_pb2_grpc as pb_grpc

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
PROMPT = [1, 300, 301, 302, 17, 99]


class Server:
    """A `ServerApp` on free ports with its event loop in a thread; `stub` and `health()` talk to it."""

    def __init__(self, *overrides: str):
        cfg = load_config(overrides=["server.port=0", "telemetry.metrics_port=0", "cache.num_blocks=64",
                                     "engine.seed=0", *overrides])
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.app = ServerApp(cfg)
        try:
            asyncio.run_coroutine_threadsafe(self.app.start(), self.loop).result(180)
        except BaseException:
            self.stop()
            raise
        self.address = f"127.0.0.1:{self.app.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.GenerationServiceStub(self.channel)

    def health(self) -> int:
        return health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.app.drain_and_stop(), self.loop).result(60)
        if hasattr(self, "channel"):
            self.channel.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _metrics(srv: Server) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, scraped from the server's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.app.metrics_port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def _request(max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt_token_ids=PROMPT, sampling_params=pb.SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


@pytest.fixture(scope="module")
def ray_server(tiny_model_dir):
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # "local": a new cluster of our own, never one another process on this host started
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False)  # fake GPUs: bundles, no CUDA
    srv = None
    try:
        srv = Server(f"model.path={tiny_model_dir}", "executor=ray", "placement.workers=2",
                     "ray.collective_timeout_s=60", "ray.placement_timeout_s=60", "telemetry.per_expert_metrics=true")
        yield srv
    finally:
        if srv is not None:
            srv.stop()
        ray.shutdown()


def test_apply_placement_mid_stream_keeps_tokens_and_stats_show_ranks(ray_server, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="moe_runtime.cluster.placement")
    srv = ray_server
    expected = list(srv.stub.Generate(_request(160), timeout=60).token_ids)
    engine = srv.app.engine
    cfg = engine.model_config
    # every expert on rank 0 but expert 0 of every layer, which moves to rank 1 with a copy on rank 0
    layout = round_robin(cfg.num_hidden_layers, cfg.num_local_experts, 2)
    skewed = {"*": {0: list(range(cfg.num_local_experts)), 1: [0]}}
    path = tmp_path / "placement.yaml"
    path.write_text(f"placement:\n  workers: 2\n  explicit: {skewed}\n")
    stream = srv.stub.GenerateStream(_request(160), timeout=60)
    tokens = list(next(stream).token_ids)
    steps_before = srv.app.engine.make_stats().steps
    assert cli.main(["apply-placement", "--server", srv.address, str(path)]) == 0
    assert srv.app.engine.make_stats().num_running == 1, "the stream should still be running after the move"
    assert srv.app.engine.make_stats().steps > steps_before
    assert "applied" in capsys.readouterr().out
    for chunk in stream:
        tokens.extend(chunk.token_ids)
    assert tokens == expected
    assert engine.placement.local_experts(1, 0) == [0] and engine.placement != layout
    stats = srv.stub.GetExpertStats(pb.GetExpertStatsRequest(), timeout=10)
    assert [r.expert_copies for r in stats.ranks] == [cfg.num_hidden_layers * cfg.num_local_experts,
                                                       cfg.num_hidden_layers]
    assert stats.rank_imbalance >= 1.0 and sum(r.tokens for r in stats.ranks) > 0
    # the placement rank by rank, each rank's step times and expert bytes
    L = cfg.num_hidden_layers
    assert [[list(e.ids) for e in r.experts] for r in stats.ranks] == [
        [engine.placement.local_experts(n, layer) for layer in range(L)] for n in range(2)]
    assert all(0 < r.collective_s < r.step_s for r in stats.ranks)  # the all-reduces are timed, within the step
    assert [r.expert_bytes for r in stats.ranks] == engine.expert_bytes()
    metrics = _metrics(srv)
    for rank in ("0", "1"):
        assert metrics[("moe_runtime_rank_step_seconds_total", (("rank", rank),))] > 0
        assert metrics[("moe_runtime_rank_window_tokens", (("rank", rank),))] == stats.ranks[int(rank)].tokens
    placement = [key for key in metrics if key[0] == "moe_runtime_expert_placement"]
    assert len(placement) == sum(r.expert_copies for r in stats.ranks)
    assert metrics[("moe_runtime_expert_placement", (("expert", "0"), ("layer", "0"), ("rank", "1")))] == 0.5
    assert cli.main(["stats", "--server", srv.address]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "load per rank" in out and "own work ms" in out and "placement: the ranks holding each expert" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("placement:\n  workers: 3\n")
    with pytest.raises(grpc.RpcError) as err:
        srv.stub.ApplyPlacement(pb.ApplyPlacementRequest(placement_yaml=bad.read_text()), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "placement.workers=3" in err.value.details()
    deadline = time.monotonic() + 10  # the server logs a refusal just after the client has its status
    while len(lines := [json.loads(r.getMessage()) for r in caplog.records
                        if r.name == "moe_runtime.cluster.placement"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [(line["accepted"], line["status"]) for line in lines] == [(True, "OK"), (False, "INVALID_ARGUMENT")]
    assert all(line["by"].startswith(("ipv4:127.0.0.1:", "ipv6:")) for line in lines)
    assert lines[0]["copies_added"] > 0 and "placement.workers=3" in lines[1]["error"]


def test_killed_worker_mid_stream_unavailable_then_recovers(ray_server):
    srv = ray_server
    expected = list(srv.stub.Generate(_request(16), timeout=60).token_ids)
    stream = srv.stub.GenerateStream(_request(900), timeout=120)
    next(stream)
    ray.kill(srv.app.engine.engine.executor.workers[1])  # white box: kill one worker actor
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert time.monotonic() - t0 < 30
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "a Ray worker failed" in err.value.details() and "retry" in err.value.details()
    statuses = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        statuses.add(status := srv.health())
        if status == SERVING and NOT_SERVING in statuses:
            break
        time.sleep(0.05)
    assert statuses >= {NOT_SERVING, SERVING}, "health never went NOT_SERVING and back to SERVING"
    assert list(srv.stub.Generate(_request(16), timeout=60).token_ids) == expected
    assert srv.stub.GetExpertStats(pb.GetExpertStatsRequest(), timeout=10).worker_restarts == 1
    assert _metrics(srv)[("moe_runtime_worker_restarts_total", ())] == 1


def test_local_executor_refuses_apply_placement(tiny_model_dir):
    srv = Server(f"model.path={tiny_model_dir}")
    try:
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.ApplyPlacement(pb.ApplyPlacementRequest(placement_yaml="placement: {workers: 1}"), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "executor: ray" in err.value.details()
    finally:
        srv.stop()
