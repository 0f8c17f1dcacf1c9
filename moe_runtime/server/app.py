"""The serving process's life: bind -> load (health NOT_SERVING) -> serve -> drain on SIGTERM -> stop.

1. Bind the gRPC port first, so health checks answer NOT_SERVING while the model loads; then the
   OpenAI-compatible HTTP API when `server.http_port` is set (server/http/; its /health answers 503).
2. Load the engine in a worker thread; attach it; start the stats pump and `/metrics`; SERVING.
3. On SIGTERM/SIGINT (or `request_stop()`): NOT_SERVING, refuse new requests (UNAVAILABLE), let in-flight
   streams finish for up to `server.drain_grace_s`, then abort what is left in the engine (those clients get
   UNAVAILABLE "server shutting down"; HTTP: 503), stop the servers and shut the engine down. A second
   signal exits at once, without draining. Stopped while still loading, it sets `loading_cancel`, so that the
   Ray executor stops waiting for its cluster and workers and the loading thread returns (the process exits
   only after it has).
If the engine loop dies, health goes NOT_SERVING and every call answers UNAVAILABLE; the process keeps
running so that the orchestrator sees the failure through health and restarts it. While the engine rebuilds
a failed Ray executor, health is NOT_SERVING and calls answer UNAVAILABLE; then SERVING again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from moe_runtime.config import ModelConfig, RuntimeConfig, ServerConfig
from moe_runtime.server.grpc_server import (
    SERVICE_NAME,
    Backend,
    GenerationServicer,
    ServerError,
    build_server,
)
from moe_runtime.server.health import Phase, ServingState
from moe_runtime.server.metrics import MetricsServer
from moe_runtime.telemetry import Telemetry
from moe_runtime.tokenizer import Tokenizer
from moe_runtime.v1 import generation_pb2 as pb

log = logging.getLogger(__name__)


def model_info(cfg: ModelConfig, tokenizer: Tokenizer | None, model_dir: Path, max_context: int,
               dtype: str) -> pb.ModelInfo:
    """`tokenizer` None (a checkpoint without one): its name and special ids are left empty."""
    return pb.ModelInfo(
        architecture=cfg.architecture, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim, num_experts=cfg.num_local_experts, experts_per_token=cfg.num_experts_per_tok,
        dtype=dtype, max_context=max_context, model_path=str(model_dir),
        tokenizer="" if tokenizer is None else tokenizer.name,
        eos_token_id=0 if tokenizer is None else tokenizer.eos_token_id or 0,
        bos_token_id=0 if tokenizer is None else tokenizer.bos_token_id or 0,
    )


class ServerApp:
    """One serving process. `engine_factory(cfg, on_stats)` builds the AsyncEngine, calling `on_stats` with
    every stats snapshot its step loop takes (tests wrap it to inject faults)."""

    def __init__(self, cfg: RuntimeConfig, auth_token: str | None = None,
                 engine_factory: Callable[[RuntimeConfig, Callable[[Any], None]], Any] | None = None):
        if cfg.model.path is None:
            raise ServerError("model.path is not set; the serve command fills it with the embedded model")
        self.cfg = cfg
        self.auth_token = auth_token
        # Set when the server is stopped before it served: the Ray executor then stops waiting for the
        # cluster (the loading thread cannot be cancelled, and the process exits only once it returns).
        self.loading_cancel = threading.Event()
        self.engine_factory = engine_factory or functools.partial(_default_engine_factory, cancel=self.loading_cancel)
        self.state = ServingState((SERVICE_NAME,))
        self.servicer = GenerationServicer(self.state, cfg.server.max_queued_requests)
        self.engine: Any = None
        self.telemetry: Telemetry | None = None
        self.metrics: MetricsServer | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http: Any = None  # server.http.server.HttpFrontend when server.http_port is set
        self.http_port: int | None = None
        self._server = None
        self._watch_task: asyncio.Task | None = None
        self.rebalancer: Any = None  # cluster.auto_rebalance.AutoRebalancer with placement.auto_rebalance
        self._rebalance_task: asyncio.Task | None = None
        self._stop = asyncio.Event()
        self._signal_loop: asyncio.AbstractEventLoop | None = None  # set while stop_on_signals is active

    async def start(self) -> None:
        await self.state.set(Phase.LOADING)
        model_cfg = ModelConfig.from_pretrained(self.cfg.model.path)  # a bad path fails before binding
        exposed = exposure_warning(self.cfg.server, self.auth_token is not None)
        if exposed is not None:
            log.warning("%s", exposed)
        try:
            self._server, self.port = build_server(self.servicer, self.cfg.server, self.auth_token)
        except (RuntimeError, OSError) as e:
            raise ServerError(f"server.host={self.cfg.server.host!r} server.port={self.cfg.server.port}: "
                              f"cannot bind ({e}); pick another port or stop the other server") from None
        await self._server.start()
        log.info("gRPC listening on %s:%d (loading model)", self.cfg.server.host, self.port)
        if self.cfg.server.http_port is not None:
            await self._start_http()
        cost = self.cfg.telemetry.cost
        self.telemetry = Telemetry(model_cfg.num_hidden_layers, model_cfg.num_local_experts,
                                   model_cfg.num_experts_per_tok, self.cfg.telemetry.window_steps,
                                   usd_per_hour=cost.usd_per_hour, cost_window_s=cost.window_s)
        self.engine = await asyncio.to_thread(self.engine_factory, self.cfg, self.telemetry.observe_step)
        self._reclaim_signals()
        await self.engine.start()
        if self.engine.placement is not None:  # the Ray executor: the rank view
            self.telemetry.set_rank_shares(self.engine.placement.rank_shares())
        self._attach(model_cfg)
        tel = self.cfg.telemetry
        self.metrics = MetricsServer(self.telemetry, tel.per_expert_metrics, lambda: self.state.accepting)
        try:
            self.metrics_port = self.metrics.start(tel.metrics_host, tel.metrics_port)
        except OSError as e:
            raise ServerError(f"telemetry.metrics_port={tel.metrics_port}: cannot bind ({e})") from None
        self._watch_task = asyncio.create_task(self._watch_engine())
        if self.cfg.placement.auto_rebalance.enabled and self.engine.placement is not None:
            from moe_runtime.cluster.auto_rebalance import AutoRebalancer

            self.rebalancer = AutoRebalancer(self.cfg.placement.auto_rebalance, self.engine, self.telemetry)
            self._rebalance_task = asyncio.create_task(self.rebalancer.run())
        await self.state.set(Phase.SERVING)
        log.info("serving on %s:%d (auth %s, TLS %s), metrics on http://%s:%d/metrics", self.cfg.server.host,
                 self.port, "on" if self.auth_token else "off", "on" if self.cfg.server.tls_cert else "off",
                 tel.metrics_host, self.metrics_port)
        if self.http is not None:
            log.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", "https" if self.cfg.server.tls_cert else "http",
                     self.cfg.server.host, self.http_port)
            if self.http.chat_template_problem is not None:
                log.warning("/v1/chat/completions will answer 400: %s", self.http.chat_template_problem)

    async def _start_http(self) -> None:
        """The OpenAI-compatible HTTP API (server/http/), bound before loading like gRPC, so that its /health
        answers 503 meanwhile. Imported here: a gRPC-only process never loads the HTTP stack."""
        from moe_runtime.server.http.server import HttpFrontend

        self.http = HttpFrontend(self.state, self.cfg.server, self.auth_token)
        try:
            self.http_port = await self.http.start()
        except OSError as e:
            raise ServerError(f"server.host={self.cfg.server.host!r} server.http_port={self.cfg.server.http_port}: "
                              f"cannot bind ({e}); pick another port or stop the other server") from None
        log.info("HTTP listening on %s:%d (loading model)", self.cfg.server.host, self.http_port)

    def _in_flight(self) -> int:
        """Requests in flight on gRPC and HTTP together."""
        return len(self.servicer.in_flight) + (len(self.http.in_flight) if self.http is not None else 0)

    def _attach(self, model_cfg: ModelConfig) -> None:
        model_dir = Path(self.cfg.model.path)
        tokenizer = self.engine.tokenizer
        max_context = self.cfg.engine.max_model_len or model_cfg.max_position_embeddings
        dtype = self.cfg.model.dtype if self.cfg.model.dtype != "auto" else model_cfg.torch_dtype
        self.servicer.attach(Backend(
            engine=self.engine,
            model_info=model_info(model_cfg, tokenizer, model_dir, max_context, dtype),
            telemetry=self.telemetry,
        ))
        if self.http is not None:
            self.http.attach(self.engine, self.telemetry, str(model_dir), max_context)

    async def _watch_engine(self, interval_s: float = 0.05) -> None:
        """Health follows the engine: NOT_SERVING while it rebuilds a failed executor (SERVING again after),
        and for good when its loop dies."""
        while not self.engine.is_dead:
            recovering = self.engine.is_recovering
            if recovering and self.state.phase is Phase.SERVING:
                log.error("executor failed (%s): health NOT_SERVING while it restarts", self.engine.recovering_error)
                await self.state.set(Phase.RECOVERING)
            elif not recovering and self.state.phase is Phase.RECOVERING:
                log.info("executor restarted: serving again")
                await self.state.set(Phase.SERVING)
            await asyncio.sleep(interval_s)
        log.error("engine loop died (%s): health NOT_SERVING, answering UNAVAILABLE", self.engine.dead_error)
        await self.state.set(Phase.DEAD)

    def request_stop(self) -> None:
        self._stop.set()

    @contextlib.contextmanager
    def stop_on_signals(self) -> Iterator[None]:
        """SIGTERM/SIGINT set the stop event (installed before loading, so an early SIGTERM drains too); a
        second one exits the process at once, with 128 + the signal's number."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self._signal_loop = loop
        try:
            yield
        finally:
            self._signal_loop = None
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def _reclaim_signals(self) -> None:
        """Install the stop handlers again after loading: `ray.init` (the Ray executor, on the loader thread)
        puts Ray's crash reporter on SIGTERM, which dumps a stack trace and aborts (exit 134) instead."""
        if self._signal_loop is not None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._signal_loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if not self._stop.is_set():
            log.info("%s: draining (send it again to exit at once)", sig.name)
            self._stop.set()
            return
        # The operator asked twice: no drain, no engine shutdown. Ray's local processes share the driver's
        # fate, and the OS takes back the rest.
        log.warning("second %s: exiting now without draining", sig.name)
        logging.shutdown()
        os._exit(128 + sig)

    async def wait_for_stop(self) -> None:
        await self._stop.wait()

    async def drain_and_stop(self) -> None:
        """Refuse new requests, give in-flight ones `drain_grace_s`, then stop everything."""
        if self._server is None and self.engine is None:  # start failed before binding: nothing to stop
            return
        await self.state.set(Phase.DRAINING)
        grace = self.cfg.server.drain_grace_s
        deadline = time.monotonic() + grace
        n = self._in_flight()
        log.info("draining: %d request(s) in flight, up to %.1fs", n, grace)
        while self._in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._in_flight():
            log.warning("drain grace over: ending %d request(s) with UNAVAILABLE (server shutting down)",
                        self._in_flight())
            await self.servicer.end_in_flight()
            if self.http is not None:
                await self.http.end_in_flight()  # HTTP: 503, or an error event in a started stream
            deadline = time.monotonic() + 2.0  # the engine aborts between steps; their handlers then answer
            while self._in_flight() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        if self._server is not None:
            await self._server.stop(grace=0.5)
        if self.http is not None:
            await self.http.stop()
        for task in (self._watch_task, self._rebalance_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.metrics is not None:
            self.metrics.stop()
        if self.engine is not None:
            await self.engine.shutdown()
        log.info("stopped")


def exposure_warning(cfg: ServerConfig, auth: bool) -> str | None:
    """What binding `cfg.host` exposes, when it is not a loopback address and auth or TLS is off."""
    host = cfg.host.strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        loopback = False
    tls = cfg.tls_cert is not None
    if loopback or (auth and tls):
        return None
    risks = ([] if auth else ["without auth (set MOE_RUNTIME_AUTH_TOKEN): anyone who reaches the port can generate "
                              "and move experts"]) + \
        ([] if tls else ["without TLS (server.tls_cert, server.tls_key): prompts, outputs and the token cross the "
                         "network in clear text"])
    return f"server.host={cfg.host!r} is reachable from other machines, " + "; and ".join(risks)


def _default_engine_factory(cfg: RuntimeConfig, on_stats: Callable[[Any], None],
                           cancel: threading.Event | None = None) -> Any:
    from moe_runtime.engine import AsyncEngine
    from moe_runtime.launch import build_engine

    # Ray: per-rank stats through on_stats too
    return AsyncEngine(build_engine(cfg, on_stats=on_stats, cancel=cancel), on_step=on_stats)


async def serve(cfg: RuntimeConfig, auth_token: str | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain and stop."""
    app = ServerApp(cfg, auth_token)
    with app.stop_on_signals():
        try:
            start = asyncio.create_task(app.start())
            stop = asyncio.create_task(app.wait_for_stop())
            await asyncio.wait({start, stop}, return_when=asyncio.FIRST_COMPLETED)
            if start.done():
                start.result()  # raise a start-up error
                await stop
            else:  # stopped while loading
                app.loading_cancel.set()
                start.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await start
        finally:
            await app.drain_and_stop()
