"""Health follows the engine: NOT_SERVING while loading and after the step loop dies; calls then answer
UNAVAILABLE at once instead of hanging."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe_runtime.config import load_config
from moe_runtime.engine import AsyncEngine, LLMEngine
from moe_runtime.server.app import ServerApp
from moe_runtime.v1 import generation_pb2_grpc as pb_grpc

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


class FaultyEngine:
    """An LLMEngine whose next step raises once `fail` is set (a lost device, a kernel fault)."""

    def __init__(self, engine: LLMEngine):
        self._engine = engine
        self.fail = threading.Event()

    def step(self):
        if self.fail.is_set():
            raise RuntimeError("simulated device failure")
        return self._engine.step()

    def __getattr__(self, name):
        return getattr(self._engine, name)


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _wait_health(address: str, status: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while (got := _health(address)) != status and time.monotonic() < deadline:
        time.sleep(0.02)
    return got


def test_engine_death_answers_unavailable(start_server, stub_for, request_for):
    faulty: list[FaultyEngine] = []

    def factory(cfg, on_stats):
        faulty.append(FaultyEngine(LLMEngine(cfg)))
        return AsyncEngine(faulty[0], on_step=on_stats)

    with start_server(engine_factory=factory) as srv:
        stub = stub_for(srv)
        stream = stub.GenerateStream(request_for(max_tokens=3000, ignore_eos=True), timeout=30)
        next(stream)
        faulty[0].fail.set()
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            list(stream)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "simulated device failure" in err.value.details()
        assert time.monotonic() - t0 < 5
        assert _wait_health(srv.address, NOT_SERVING) == NOT_SERVING
        for rpc in ("Generate", "GenerateStream"):
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                result = getattr(stub, rpc)(request_for(max_tokens=2), timeout=10)
                if rpc == "GenerateStream":
                    list(result)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "engine is down" in err.value.details()
            assert time.monotonic() - t0 < 2


def test_not_serving_while_loading(tiny_model_dir, request_for):
    release = threading.Event()

    def slow_factory(cfg, on_stats):
        release.wait(30)
        return AsyncEngine(LLMEngine(cfg), on_step=on_stats)

    cfg = load_config(overrides=[f"model.path={tiny_model_dir}", "server.port=0", "telemetry.metrics_port=0",
                                 "cache.num_blocks=64"])
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    app = ServerApp(cfg, engine_factory=slow_factory)
    started = asyncio.run_coroutine_threadsafe(app.start(), loop)
    try:
        deadline = time.monotonic() + 10
        while app.port is None and time.monotonic() < deadline:
            time.sleep(0.01)
        address = f"127.0.0.1:{app.port}"
        assert _health(address) == NOT_SERVING
        with grpc.insecure_channel(address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.GenerationServiceStub(channel).Generate(request_for(max_tokens=2), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.value.details()
        release.set()
        started.result(30)
        assert _health(address) == SERVING
    finally:
        release.set()
        asyncio.run_coroutine_threadsafe(app.drain_and_stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
