"""The HTTP API's server: uvicorn, as a task on the serving process's own event loop, beside gRPC.

`ServerApp` (server/app.py) starts it right after gRPC binds, so that `/health` answers 503 while the model
loads, attaches the loaded engine to it, and on SIGTERM drains it with gRPC: both refuse new requests
(503) while in-flight streams get `server.drain_grace_s`, then what is left is aborted, then both stop.

Two things differ from `uvicorn.run`: the socket is bound here (so a port taken is an error at start and
port 0 tells its number at once), and uvicorn installs no signal handlers (the process's SIGTERM drains
through `ServerApp`, which owns the signals). TLS comes from `server.tls_cert` / `server.tls_key`, as for gRPC
(tls.py has checked the pair by then).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from moe_runtime.config import ServerConfig
from moe_runtime.server.health import ServingState
from moe_runtime.server.http.chat_template import ChatTemplateError, load_chat_template
from moe_runtime.server.http.openai_format import TokenTexts
from moe_runtime.server.http.routes import HttpBackend, OpenAIService
from moe_runtime.telemetry import Telemetry

STOP_GRACE_S = 2.0  # after the drain: seconds uvicorn waits for connections to finish before cancelling them


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its signal handlers, with an event set once it accepts connections."""

    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self.ready = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the serving process's SIGTERM/SIGINT handlers stay in place (ServerApp.stop_on_signals)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


class HttpFrontend:
    """The OpenAI-compatible API of one serving process: its routes (`service`) and its uvicorn server."""

    def __init__(self, state: ServingState, cfg: ServerConfig, auth_token: str | None = None):
        self.cfg = cfg
        self.service = OpenAIService(state, cfg, auth_token)
        self.port: int | None = None
        self._server: _EmbeddedUvicorn | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        """Bind (cfg.host, cfg.http_port) and start serving; returns the port. `OSError` when it cannot bind."""
        sock = _bind(self.cfg.host, self.cfg.http_port or 0)
        config = uvicorn.Config(
            # log_config=None: the process's logging stays as `serve` set it; uvicorn's own lines only from
            # warnings up (its "Started server process" would be wrong here); the request log line replaces
            # the access log.
            self.service.app, log_config=None, log_level="warning", access_log=False, lifespan="off",
            server_header=False,
            ssl_certfile=self.cfg.tls_cert, ssl_keyfile=self.cfg.tls_key, timeout_graceful_shutdown=STOP_GRACE_S,
        )
        self._server = _EmbeddedUvicorn(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="moe-runtime-http")
        ready = asyncio.create_task(self._server.ready.wait())
        await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():  # serve() ended before accepting: raise its error
            ready.cancel()
            self._task.result()
            raise OSError(f"uvicorn stopped while starting on {self.cfg.host}:{sock.getsockname()[1]}")
        self.port = sock.getsockname()[1]
        return self.port

    def attach(self, engine: Any, telemetry: Telemetry, model_dir: str, max_context: int) -> None:
        """Serve from the loaded engine: the model's id, its chat template (or why it has none), token texts."""
        try:
            template: Any = load_chat_template(model_dir)
        except ChatTemplateError as e:
            template = e  # /v1/chat/completions answers 400 with this; completions work
        self.service.attach(HttpBackend(
            engine=engine, telemetry=telemetry, model_id=self.cfg.served_model_name or Path(model_dir).name,
            max_context=max_context, chat_template=template, texts=TokenTexts(engine.tokenizer),
            created=int(time.time()),
        ))

    @property
    def chat_template_problem(self) -> str | None:
        """Why /v1/chat/completions cannot serve (None: it can, or not attached yet)."""
        b = self.service.backend
        return str(b.chat_template) if b is not None and isinstance(b.chat_template, ChatTemplateError) else None

    @property
    def in_flight(self) -> set[str]:
        return self.service.in_flight

    async def end_in_flight(self) -> None:
        await self.service.end_in_flight()

    async def stop(self) -> None:
        """Close the port and the connections (idle keep-alive ones at once, busy ones within STOP_GRACE_S)."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await self._task


def _bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on (host, port), IPv4 or IPv6 as `host` resolves."""
    family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart without waiting out TIME_WAIT
        sock.bind(address)
        sock.listen()  # a port someone else listens on fails here, not later inside uvicorn
    except OSError:
        sock.close()
        raise
    return sock
