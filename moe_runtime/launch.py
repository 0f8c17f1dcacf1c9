"""Assembling a process's engine: the executor `cfg.executor` names, handed to the engine.

Here, and not in `engine/`, because the Ray executor lives in `cluster/`, which builds on the engine: the
engine never imports the cluster package (DESIGN.md section 3, Seams). Commands, the server and benchmarks
build their engines through `build_engine`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from moe_runtime.config import RuntimeConfig
from moe_runtime.engine.executor import Executor, LocalExecutor
from moe_runtime.engine.llm_engine import LLMEngine
from moe_runtime.errors import ConfigError


def make_executor(cfg: RuntimeConfig, progress: bool = False, on_stats: Callable[[Any], None] | None = None,
                  cancel: threading.Event | None = None) -> Executor:
    """The executor `cfg.executor` names: in this process, or Ray workers (Ray imported only then).

    on_stats: the telemetry hook (`Telemetry.observe_step`); the Ray executor reports its per-rank
    `RankStats` through it. The local executor has no ranks and reports nothing.
    cancel: the Ray executor stops waiting for the cluster or its bundles once it is set (a server stopped
    while starting); the local executor has nothing to wait for.
    """
    if cfg.model.path is None:
        raise ConfigError("model.path=None: the engine needs a checkpoint directory (see ensure_default_model)")
    if cfg.executor == "ray":
        from moe_runtime.cluster.ray_executor import RayExecutor

        return RayExecutor(cfg, cfg.model.path, on_stats, cancel)
    return LocalExecutor(cfg, cfg.model.path, progress)


def build_engine(cfg: RuntimeConfig, progress: bool = False, on_stats: Callable[[Any], None] | None = None,
                 cancel: threading.Event | None = None) -> LLMEngine:
    """An `LLMEngine` over the executor `cfg.executor` names (`on_stats`, `cancel`: see `make_executor`)."""
    return LLMEngine(cfg, make_executor(cfg, progress, on_stats, cancel))
