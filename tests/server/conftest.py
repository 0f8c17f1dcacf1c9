"""Server fixtures: a real `ServerApp` on free loopback ports, its event loop in a background thread.

Each test module starts its own server (module-scoped fixture built with `start_server`), always stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
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
        self.http_url = None if self.app.http_port is None else f"http://127.0.0.1:{self.app.http_port}"
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
                    and not self.app.servicer.in_flight and not (self.app.http and self.app.http.in_flight))
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


# Mixtral-8x7B-Instruct's chat template (tokenizer_config.json on the hub), verbatim: roles must alternate.
MIXTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="session")
def chat_model_dir(tiny_model_dir: Path, tmp_path_factory) -> Path:
    """The `tiny` checkpoint with Mixtral-Instruct's chat template in its tokenizer_config.json."""
    out = tmp_path_factory.mktemp("tiny-chat")
    for f in tiny_model_dir.iterdir():
        shutil.copy(f, out / f.name)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": MIXTRAL_CHAT_TEMPLATE}))
    return out


@pytest.fixture(scope="session")
def openai_for() -> Callable[..., Any]:
    """`openai_for(server, api_key=...)`: the official `openai` client on the server's HTTP API, no retries
    (a test sees each status as the server answered it), closed at session end."""
    import openai  # the HTTP tests' dependency only: gRPC tests run without it

    clients: list[Any] = []

    def make(srv: RunningServer, api_key: str = "unused", **kwargs: Any) -> Any:
        assert srv.http_url is not None, "start the server with server.http_port=0"
        client = openai.OpenAI(base_url=srv.http_url + "/v1", api_key=api_key, max_retries=0, timeout=60,
                               **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
