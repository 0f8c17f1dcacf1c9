"""Executors run a scheduled step on the model wherever it lives: the engine's only view of the model.

`LocalExecutor`: in this process. The Ray executor (`cluster/ray_executor.py`) implements the same
interface across expert-parallel worker actors. Which one runs is chosen where the process is assembled
(`moe_runtime.launch`) and handed to the engine, so the engine never imports the cluster package.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch

from moe_runtime.checkpoint.layout import resolve_dtype
from moe_runtime.checkpoint.loader import load_weights, read_config, resolve_device, weight_formats
from moe_runtime.config import ModelConfig, RuntimeConfig
from moe_runtime.engine.kv_cache import allocate_kv_cache, num_kv_blocks
from moe_runtime.engine.model_runner import ModelRunner
from moe_runtime.engine.parts import choose_kernels, complete_plan, cpu_plan, make_forward, model_parts
from moe_runtime.engine.prefill_chunk import ladder_limit
from moe_runtime.engine.sampler import Sampler
from moe_runtime.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from moe_runtime.engine.spec import make_proposer
from moe_runtime.errors import UnsupportedError
from moe_runtime.model.experts import LocalExpertsBuilder
from moe_runtime.offload import OffloadedExpertsBuilder, OffloadStats


class Executor(ABC):
    """Owns the model and its KV cache; the engine sends it scheduler outputs and asks it these few things."""

    model_config: ModelConfig
    num_kv_blocks: int  # blocks in each layer's pool: the block manager manages exactly these
    # Whether `restart` can rebuild the executor after a lost worker (`EngineDeadError` from `execute`).
    can_restart: bool = False
    # Seconds a placement change may take before the caller gives up on it.
    placement_timeout_s: float = math.inf
    # Prompt tokens per step measured on this executor's model (`engine.prefill_chunk: auto`,
    # engine/prefill_chunk.py); None: not measured here, the engine uses the configured cap.
    measured_prefill_chunk: int | None = None

    @abstractmethod
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step: forward the scheduled tokens and sample for requests that reached their end."""

    @abstractmethod
    def shutdown(self) -> None:
        """Release workers and memory. Idempotent."""

    def check_health(self) -> None:
        """Raise `EngineDeadError` when a worker is gone (called between steps while idle)."""
        return None  # one process: nothing can be gone

    def restart(self) -> None:
        """Rebuild after a failure; the engine has failed every in-flight request first."""
        raise UnsupportedError(f"{type(self).__name__} cannot restart after a failure")

    def offload_stats(self) -> OffloadStats | None:
        """The expert store's counters when experts are offloaded, else None."""
        return None

    @property
    def placement(self) -> Any:
        """Which worker holds which experts (the cluster's `Placement`); None in one process."""
        return None

    def apply_placement(self, placement: Any) -> None:
        """Move experts between workers to follow `placement`, between steps."""
        raise UnsupportedError(
            "moving experts needs the Ray executor; this process runs executor: local (start it with "
            "executor: ray and placement.workers, e.g. configs/tiny-ray-2-workers.yaml)"
        )

    def expert_bytes(self) -> list[int]:
        """Bytes of expert weights each worker holds (one entry per worker)."""
        raise UnsupportedError(f"{type(self).__name__} does not report expert bytes per worker")


class LocalExecutor(Executor):
    """The model in this process, its kernels and step runner chosen for its device (engine/parts.py)."""

    def __init__(self, cfg: RuntimeConfig, model_dir: str, progress: bool = False):
        if cfg.engine.num_threads is not None:
            torch.set_num_threads(cfg.engine.num_threads)
        self.model_config = read_config(model_dir)
        dtype, device = resolve_dtype(cfg.model.dtype, self.model_config), resolve_device(cfg.model.device)
        kernels = choose_kernels(cfg.model, device, dtype)
        formats = weight_formats(model_dir, cfg.model)  # the plan is measured in the formats loaded
        plan = cpu_plan(kernels, self.model_config, dtype, cfg.engine, formats)  # None off the CPU fast path
        self._offload = OffloadedExpertsBuilder(cfg.offload, kernels.moe) if cfg.offload.enabled else None
        experts = self._offload or LocalExpertsBuilder(kernels.moe, None if plan is None else plan.expert)
        self.model = load_weights(model_dir, cfg.model, model_parts(kernels, experts, plan), progress)
        self.num_kv_blocks = num_kv_blocks(cfg, self.model_config, self.model.dtype, self.model.device)
        kv = allocate_kv_cache(
            self.model_config, self.num_kv_blocks, cfg.cache.block_size, self.model.dtype, self.model.device
        )
        # The prefill chunk is measured for `auto` with local experts only: an offload store's fetches at
        # start-up say nothing about its steady state (`auto` is the step cap then).
        chunk_limit = None
        if cfg.engine.prefill_chunk == "auto" and self._offload is None:
            chunk_limit = ladder_limit(cfg.engine, self.model_config, self.num_kv_blocks * cfg.cache.block_size)
        plan = complete_plan(self.model, kv, kernels, cfg.engine, plan, chunk_limit)  # parts timed on the model
        if chunk_limit is not None and plan is not None and plan.prefill is not None:
            self.measured_prefill_chunk = plan.prefill.chunk
        forward = make_forward(self.model, kv, kernels, cfg.engine, graphs_allowed=self._offload is None, plan=plan)
        proposer = make_proposer(cfg, self.model_config, self.num_kv_blocks, progress)
        self.runner = ModelRunner(self.model, kv, cfg.cache.block_size, Sampler(cfg.engine.seed), forward, proposer)

    @property
    def expert_store(self):
        """The offload `ExpertStore` when experts are offloaded, else None."""
        return None if self._offload is None else self._offload.store

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(sched)

    def offload_stats(self) -> OffloadStats | None:
        store = self.expert_store
        return None if store is None else store.stats()

    def shutdown(self) -> None:
        self.runner.kv_caches.clear()
        if self.expert_store is not None:
            self.expert_store.close()
