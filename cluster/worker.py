"""One expert-parallel worker: the process behind one Ray actor (one bundle, one GPU on GPU hosts).

Every worker holds the replicated non-expert weights, only its own experts (`Placement`), a full KV cache,
and a `ModelRunner`; it runs every step SPMD on the whole batch, and the MoE layers sum their shares over the
process group (`ShardedExperts`). All ranks sample the same tokens (identical logits after the all_reduce,
and samplers with the same seed), so their request states stay identical without further messages.
This class is plain Python; `RayExecutor` turns it into an actor with `ray.remote`.
"""

from __future__ import annotations

import datetime
import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_runtime.checkpoint.layout import resolve_dtype
from moe_runtime.checkpoint.loader import load_model, read_config, resolve_device, weight_formats
from moe_runtime.cluster.expert_parallel import ShardedExpertsBuilder
from moe_runtime.cluster.placement import Placement
from moe_runtime.cluster.rank_group import clock_for
from moe_runtime.config import RuntimeConfig
from moe_runtime.engine.kv_cache import allocate_kv_cache
from moe_runtime.engine.model_runner import ModelRunner
from moe_runtime.engine.parts import choose_kernels, cpu_plan, make_forward, model_parts
from moe_runtime.engine.sampler import Sampler
from moe_runtime.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput


@dataclass(frozen=True)
class StepReport:
    """What one rank sends back from a step: rank 0's output (None on the others, whose output is the same)
    and its timings, for telemetry's rank view."""

    output: ModelRunnerOutput | None
    step_s: float  # wall time of the step on this rank
    collective_s: float  # of which in the MoE all-reduces


class ExpertWorker:
    """Rank `rank` of `placement.workers`. Construction is cheap; `setup` joins the group and loads."""

    def __init__(self, rank: int, cfg: RuntimeConfig, model_dir: str, placement: Placement, seed: int):
        self.rank, self.cfg, self.model_dir, self.placement, self.seed = rank, cfg, model_dir, placement, seed
        self.runner: ModelRunner | None = None
        self.experts: ShardedExpertsBuilder | None = None

    def master_address(self) -> tuple[str, int]:
        """This node's address and a free port, for rank 0 to host the process group's store."""
        import ray

        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return host, s.getsockname()[1]

    def setup(self, host: str, port: int, num_kv_blocks: int) -> int:
        """Join the process group, load the model keeping only this rank's experts, allocate the KV cache.

        Returns the bytes of the expert weights this rank holds (tests check the sharding).
        """
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout = datetime.timedelta(seconds=self.cfg.ray.collective_timeout_s)
        dist.init_process_group(
            backend,
            init_method=f"tcp://{host}:{port}",
            rank=self.rank,
            world_size=self.placement.workers,
            timeout=timeout,
        )
        if self.cfg.engine.num_threads is not None:
            torch.set_num_threads(self.cfg.engine.num_threads)
        m = self.cfg.model
        model_cfg = read_config(self.model_dir)
        # as LocalExecutor: the same kernels as the local engine on this device
        dtype = resolve_dtype(m.dtype, model_cfg)
        device = resolve_device(m.device)
        kernels = choose_kernels(m, device, dtype)
        formats = weight_formats(self.model_dir, m)  # 8-bit experts / dense projections, as the local engine
        plan = cpu_plan(kernels, model_cfg, dtype, self.cfg.engine, formats)  # the local engine's measured plan
        # the replicated weights and only this rank's experts (never the whole model)
        # built in the experts' format, so that the loader's `quantized` keeps this builder (the one `apply`
        # and `expert_bytes` ask)
        self.experts = ShardedExpertsBuilder(self.placement, self.rank, dist.group.WORLD, kernels.moe,
                                             clock_for(device), formats.experts)
        model = load_model(self.model_dir, m.dtype, m.device, parts=model_parts(kernels, self.experts, plan),
                           quantization=m.quantization, quantize_dense=m.quantize_dense)
        kv = allocate_kv_cache(
            model.config, num_kv_blocks, self.cfg.cache.block_size, model.dtype, model.device
        )
        forward = make_forward(model, kv, kernels, self.cfg.engine, graphs_allowed=False, plan=plan)  # a collective per layer
        self.runner = ModelRunner(model, kv, self.cfg.cache.block_size, Sampler(self.seed), forward)
        return self.experts.expert_bytes()

    def apply_placement(self, placement: Placement) -> int:
        """Hold `placement`'s experts from now on: keep the ones already here, read the others from the
        checkpoint. Call between steps, on every rank. Returns the bytes of expert weights now held."""
        assert self.experts is not None and placement.workers == self.placement.workers
        self.experts.apply(placement)
        self.placement = placement
        return self.experts.expert_bytes()

    def ping(self) -> bool:
        return self.runner is not None

    def node_id(self) -> str:
        """The Ray node this rank runs on (tests check `placement.nodes`)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def execute(self, sched: SchedulerOutput) -> StepReport:
        """Run one step. Rank 0's report carries the output; the others' None (their output is identical)."""
        assert self.runner is not None and self.experts is not None, "setup() first"
        t0 = time.perf_counter()
        out = self.runner.execute(sched)  # ends with the host copy of the sampled tokens: synchronized
        step_s = time.perf_counter() - t0
        return StepReport(out if self.rank == 0 else None, step_s, self.experts.clock.take())

    def shutdown(self) -> None:
        self.runner = self.experts = None
        if dist.is_initialized():
            dist.destroy_process_group()
