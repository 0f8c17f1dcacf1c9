"""The HTTP API follows the serving phase like gRPC's health: 503 while the model loads and after the engine
died, at once; a stream in flight when the engine dies ends with an error event, not a hang."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx2
import openai
import pytest

from moe_runtime.config import load_config
from moe_runtime.engine import AsyncEngine, LLMEngine
from moe_runtime.server.app import ServerApp


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


def test_engine_death_answers_503(start_server, openai_for):
    faulty: list[FaultyEngine] = []

    def factory(cfg, on_stats):
        faulty.append(FaultyEngine(LLMEngine(cfg)))
        return AsyncEngine(faulty[0], on_step=on_stats)

    with start_server("server.http_port=0", engine_factory=factory) as srv:
        client = openai_for(srv)
        model = client.models.list().data[0].id
        stream = iter(client.completions.create(model=model, prompt="x", max_tokens=3000, stream=True,
                                                extra_body={"ignore_eos": True}))
        next(stream)
        faulty[0].fail.set()
        with pytest.raises(openai.APIError) as err:
            list(stream)
        assert "engine is down" in err.value.message and "simulated device failure" in err.value.message
        t0 = time.monotonic()
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model=model, prompt="x", max_tokens=2)
        assert err.value.status_code == 503 and err.value.code == "engine_unavailable"
        assert time.monotonic() - t0 < 2
        health = httpx2.get(srv.http_url + "/health", timeout=5)
        assert health.status_code == 503 and health.json() == {"status": "dead"}


def test_503_while_loading(tiny_model_dir):
    release = threading.Event()

    def slow_factory(cfg, on_stats):
        release.wait(30)
        return AsyncEngine(LLMEngine(cfg), on_step=on_stats)

    cfg = load_config(overrides=[f"model.path={tiny_model_dir}", "server.port=0", "server.http_port=0",
                                 "telemetry.metrics_port=0", "cache.num_blocks=64"])
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    app = ServerApp(cfg, engine_factory=slow_factory)
    started = asyncio.run_coroutine_threadsafe(app.start(), loop)
    try:
        deadline = time.monotonic() + 10
        while app.http_port is None and time.monotonic() < deadline:  # start() is still running: no event
            time.sleep(0.01)
        url = f"http://127.0.0.1:{app.http_port}"
        health = httpx2.get(url + "/health", timeout=5)
        assert health.status_code == 503 and health.json() == {"status": "loading"}
        for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models")):
            response = httpx2.request(method, url + path, json={"prompt": "hi"} if method == "POST" else None,
                                      timeout=5)
            assert response.status_code == 503 and "loading" in response.json()["error"]["message"]
            assert response.headers["retry-after"] == "1"
        release.set()
        started.result(30)
        assert httpx2.get(url + "/health", timeout=5).status_code == 200
    finally:
        release.set()
        asyncio.run_coroutine_threadsafe(app.drain_and_stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
