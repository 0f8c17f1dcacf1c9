"""Executors run a scheduled step on the model wherever it lives. `LocalExecutor`: in this process.

The Ray executor (`moe_runtime.cluster`) implements the same interface across worker actors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from moe_runtime.config import ModelConfig, RuntimeConfig
from moe_runtime.engine.kv_cache import allocate_kv_cache, num_kv_blocks
from moe_runtime.engine.model_runner import ModelRunner
from moe_runtime.engine.sampler import Sampler
from moe_runtime.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from moe_runtime.model.loader import load_model
from moe_runtime.offload.stats import OffloadStats


class Executor(ABC):
    """Owns the model and its KV cache; the engine only sends it scheduler outputs."""

    model_config: ModelConfig
    num_kv_blocks: int  # blocks in each layer's pool: the block manager manages exactly these

    @abstractmethod
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step: forward the scheduled tokens and sample for requests that reached their end."""

    @abstractmethod
    def shutdown(self) -> None:
        """Release workers and memory. Idempotent."""

    def offload_stats(self) -> OffloadStats | None:
        """The expert store's counters when experts are offloaded, else None."""
        return None


class LocalExecutor(Executor):
    def __init__(self, cfg: RuntimeConfig, model_dir: str, progress: bool = False):
        if cfg.engine.num_threads is not None:
            torch.set_num_threads(cfg.engine.num_threads)
        self.model = load_model(
            model_dir, cfg.model.dtype, cfg.model.device, cfg.model.moe_backend, progress, offload=cfg.offload
        )
        if not cfg.model.exact:  # CPUs without native bf16 GEMMs; no-ops on GPUs and for fp32 weights
            self.model.keep_fp32_copies()  # large batches
            self.model.use_fast_cpu_paths()  # small batches and expert groups
        self.model_config = self.model.config
        self.num_kv_blocks = num_kv_blocks(cfg.cache, self.model_config, self.model.dtype)
        kv = allocate_kv_cache(
            self.model_config, self.num_kv_blocks, cfg.cache.block_size, self.model.dtype, self.model.device
        )
        self.runner = ModelRunner(self.model, kv, cfg.cache.block_size, Sampler(cfg.engine.seed))

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(sched)

    def offload_stats(self) -> OffloadStats | None:
        store = self.model.expert_store
        return None if store is None else store.stats()

    def shutdown(self) -> None:
        self.runner.kv_caches.clear()
        if self.model.expert_store is not None:
            self.model.expert_store.close()
