"""The serving process's life: bind -> load (health NOT_SERVING) -> serve -> drain on SIGTERM -> stop.

1. Bind the gRPC port first, so health checks answer NOT_SERVING while the model loads.
2. Load the engine in a worker thread; attach it; start the stats pump and `/metrics`; SERVING.
3. On SIGTERM/SIGINT (or `request_stop()`): NOT_SERVING, refuse new requests (UNAVAILABLE), let in-flight
   streams finish for up to `server.drain_grace_s`, then stop the server (cancelling what is left, which
   aborts those requests in the engine) and shut the engine down.
If the engine loop dies, health goes NOT_SERVING and every call answers UNAVAILABLE; the process keeps
running so that the orchestrator sees the failure through health and restarts it. While the engine rebuilds
a failed Ray executor, health is NOT_SERVING and calls answer UNAVAILABLE; then SERVING again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from moe_runtime.config import ModelConfig, RuntimeConfig
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
        self.engine_factory = engine_factory or _default_engine_factory
        self.state = ServingState((SERVICE_NAME,))
        self.servicer = GenerationServicer(self.state, cfg.server.max_queued_requests)
        self.engine: Any = None
        self.telemetry: Telemetry | None = None
        self.metrics: MetricsServer | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server = None
        self._watch_task: asyncio.Task | None = None
        self.rebalancer: Any = None  # cluster.auto_rebalance.AutoRebalancer with placement.auto_rebalance
        self._rebalance_task: asyncio.Task | None = None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        await self.state.set(Phase.LOADING)
        try:
            self._server, self.port = build_server(self.servicer, self.cfg.server, self.auth_token)
        except (RuntimeError, OSError) as e:
            raise ServerError(f"server.host={self.cfg.server.host!r} server.port={self.cfg.server.port}: "
                              f"cannot bind ({e}); pick another port or stop the other server") from None
        await self._server.start()
        log.info("gRPC listening on %s:%d (loading model)", self.cfg.server.host, self.port)
        model_cfg = ModelConfig.from_pretrained(self.cfg.model.path)
        self.telemetry = Telemetry(model_cfg.num_hidden_layers, model_cfg.num_local_experts,
                                   model_cfg.num_experts_per_tok, self.cfg.telemetry.window_steps)
        self.engine = await asyncio.to_thread(self.engine_factory, self.cfg, self.telemetry.observe_step)
        await self.engine.start()
        if self.engine.placement is not None:  # the Ray executor: the rank view
            self.telemetry.set_rank_shares(self.engine.placement.rank_shares())
        self._attach(model_cfg)
        tel = self.cfg.telemetry
        self.metrics = MetricsServer(self.telemetry, tel.per_expert_metrics)
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
        log.info("serving on %s:%d, metrics on http://%s:%d/metrics", self.cfg.server.host, self.port,
                 tel.metrics_host, self.metrics_port)

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
        """SIGTERM/SIGINT set the stop event (installed before loading, so an early SIGTERM drains too)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def wait_for_stop(self) -> None:
        await self._stop.wait()

    async def drain_and_stop(self) -> None:
        """Refuse new requests, give in-flight ones `drain_grace_s`, then stop everything."""
        await self.state.set(Phase.DRAINING)
        grace = self.cfg.server.drain_grace_s
        deadline = time.monotonic() + grace
        n = len(self.servicer.in_flight)
        log.info("draining: %d request(s) in flight, up to %.1fs", n, grace)
        while self.servicer.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.servicer.in_flight:
            log.warning("drain grace over: cancelling %d request(s)", len(self.servicer.in_flight))
        if self._server is not None:
            await self._server.stop(grace=0.5)
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


def _default_engine_factory(cfg: RuntimeConfig, on_stats: Callable[[Any], None]) -> Any:
    from moe_runtime.engine import AsyncEngine
    from moe_runtime.launch import build_engine

    return AsyncEngine(build_engine(cfg), on_step=on_stats)


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
                start.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await start
        finally:
            await app.drain_and_stop()
