"""Server fixtures: a real `ServerApp` on free loopback ports, its event loop in a background thread.

Each test module starts its own server (module-scoped fixture built with `start_server`), always stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from moe_runtime.config import load_config
from moe_runtime.server.app import ServerApp
from moe_runtime.v1 import generation_pb2 as pb
from moe_runtime.v1 import generation_pb2_grpc as pb_grpc


class RunningServer:
    """A started `ServerApp`; `call(coro)` runs a coroutine on its loop. Stop with `stop()`."""

    def __init__(self, model_dir: Path, overrides: tuple[str, ...] = (), auth_token: str | None = None,
                 engine_factory: Callable | None = None):
        cfg = load_config(overrides=[f"model.path={model_dir}", "server.port=0", "telemetry.metrics_port=0",
                                     "cache.num_blocks=256", *overrides])
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self.thread.start()
        self.app = ServerApp(cfg, auth_token, engine_factory)
        try:
            self.call(self.app.start())
        except BaseException:
            self.stop()
            raise
        self.address = f"127.0.0.1:{self.app.port}"
        self.metrics_url = f"http://127.0.0.1:{self.app.metrics_port}/metrics"

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def engine(self) -> Any:
        return self.app.engine

    def wait_idle(self, timeout: float = 10.0) -> Any:
        """Wait until no request holds KV blocks or is in flight; returns the engine stats."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.engine.make_stats()
            idle = (stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0
                    and not self.app.servicer.in_flight)
            if idle or time.monotonic() > deadline:
                return stats
            time.sleep(0.02)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.call(self.app.drain_and_stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="session")
def start_server(tiny_model_dir: Path) -> Callable[..., contextlib.AbstractContextManager[RunningServer]]:
    """`with start_server("engine.max_num_seqs=4", auth_token=...) as srv:` a server on the tiny model."""

    @contextlib.contextmanager
    def start(*overrides: str, model_dir: Path | None = None, **kwargs: Any) -> Iterator[RunningServer]:
        srv = RunningServer(model_dir or tiny_model_dir, overrides, **kwargs)
        try:
            yield srv
        finally:
            srv.stop()

    return start


@pytest.fixture(scope="session")
def stub_for() -> Callable[..., Any]:
    """`stub_for(server)` -> (GenerationServiceStub, channel) on an insecure channel, closed at session end."""
    channels: list[grpc.Channel] = []

    def make(srv: RunningServer, **options: Any) -> pb_grpc.GenerationServiceStub:
        channel = grpc.insecure_channel(srv.address, options=list(options.items()))
        channels.append(channel)
        return pb_grpc.GenerationServiceStub(channel)

    yield make
    for channel in channels:
        channel.close()


@pytest.fixture(scope="session")
def request_for() -> Callable[..., pb.GenerateRequest]:
    """`request_for("text", max_tokens=4, temperature=0)` builds a GenerateRequest (ignore_eos unless given:
    tests that count tokens must not depend on when the seeded model happens to emit EOS)."""

    def make(prompt: str | list[int] = "Hello world", request_id: str = "", **sampling: Any) -> pb.GenerateRequest:
        sampling.setdefault("ignore_eos", True)
        ids = prompt if isinstance(prompt, list) else []
        return pb.GenerateRequest(request_id=request_id, prompt=prompt if isinstance(prompt, str) else "",
                                  prompt_token_ids=ids, sampling_params=pb.SamplingParams(**sampling))

    return make
