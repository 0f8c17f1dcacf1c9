"""`RayExecutor`: the engine's executor over expert-parallel worker actors (`executor: ray` in the YAML).

Ray owns processes and placement; torch.distributed owns tensors. Start-up:
  1. Join the cluster at `ray.address`, waiting for it with backoff, or start a local one (`ray_connect`).
  2. Reserve one bundle per worker in a placement group (a GPU each when the cluster has them) and wait
     with backoff, failing with what is missing after `ray.placement_timeout_s`.
  3. One `ExpertWorker` actor per bundle; rank 0 publishes its address and a free port.
  4. Every rank joins the process group and loads its experts concurrently; `ray.get` with a timeout.
A server stopped during steps 1-4 (SIGTERM while the Ray head or the worker pods are not up yet) sets
`cancel`: every wait ends early and the executor releases what it started, so the process exits in time.
Each step the driver puts the scheduler output (already a diff: new vs cached requests) in the object store
once, every worker runs it, and rank 0's sampled tokens come back with every rank's timings. After each step,
and after starting, restarting or moving experts, the executor hands a `RankStats` (placement, expert bytes,
timings, restarts) to `on_stats`, the server's telemetry hook.
`shutdown` releases the workers and, when this executor joined or started Ray, disconnects (`ray.shutdown`,
which stops a local cluster), so that a served process drains, stops Ray and exits 0 on SIGTERM (the server
also takes SIGTERM back from Ray's crash reporter, which `ray.init` installs: a stack dump and exit 134).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from moe_runtime.checkpoint.layout import resolve_dtype
from moe_runtime.checkpoint.loader import weight_formats
from moe_runtime.cluster.placement import Placement
from moe_runtime.cluster.placement_config import resolve_placement
from moe_runtime.cluster.placement_memory import check_memory
from moe_runtime.cluster.ray_connect import StartupCancelled, connect
from moe_runtime.cluster.worker import ExpertWorker, StepReport
from moe_runtime.config import ModelConfig, RuntimeConfig
from moe_runtime.engine.executor import Executor
from moe_runtime.engine.kv_cache import num_kv_blocks
from moe_runtime.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from moe_runtime.errors import ConfigError, EngineDeadError
from moe_runtime.telemetry.ranks import RankStats

log = logging.getLogger(__name__)


class RayExecutor(Executor):
    """Runs the model on `placement.workers` Ray actors, experts sharded by the placement plan.

    on_stats: called with a `RankStats` after every step, start, restart and placement change (on the
    calling thread: the engine's step loop); None reports nothing.
    cancel: set it (another thread: the server on SIGTERM) to stop starting: the waits for Ray, for the
    workers' bundles and for the workers loading the model end early with `StartupCancelled`, and the workers
    started so far are released. Restarts after that are not affected (the server sets it only before serving).
    """

    can_restart = True

    def __init__(self, cfg: RuntimeConfig, model_dir: str, on_stats: Callable[[Any], None] | None = None,
                 cancel: threading.Event | None = None):
        self.cfg, self.model_dir, self._on_stats, self._cancel = cfg, model_dir, on_stats, cancel
        self.model_config = ModelConfig.from_pretrained(model_dir)
        dtype = resolve_dtype(cfg.model.dtype, self.model_config)
        self.dtype_name = str(dtype).removeprefix("torch.")  # "bfloat16", as ModelConfig spells dtypes
        self.experts_format = weight_formats(model_dir, cfg.model).experts  # "none", or int8 / fp8 (8 bits)
        self._placement = resolve_placement(cfg.placement, self.model_config, self.dtype_name,
                                            quantization=self.experts_format)
        self.placement_timeout_s = cfg.ray.placement_timeout_s + cfg.ray.collective_timeout_s
        self._expert_bytes: list[int] = []
        self.num_kv_blocks = num_kv_blocks(cfg, self.model_config, dtype, None)  # None: the workers hold it
        self.workers: list = []
        self._pg = None
        self.restarts = 0  # worker-group rebuilds since start
        self._shares = self._placement.rank_shares()  # [L][E][N] for telemetry, computed once per placement
        self._owns_ray = not ray.is_initialized()  # joined or started here: disconnect on shutdown
        if self._owns_ray:
            # A local cluster (no address) declares a CPU per worker bundle even on a smaller host: the
            # workers mostly wait on each other, and the bundles must fit for the placement group.
            local = {"num_cpus": max(os.cpu_count() or 1,
                                     int(cfg.placement.workers * cfg.ray.num_cpus_per_worker + 0.999))}
            connect(cfg.ray, local, cfg.server.host, cancel)
        try:
            self._start(model_dir)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, model_dir: str) -> None:
        n, ray_cfg = self._placement.workers, self.cfg.ray
        use_gpu = ray_cfg.worker_device == "gpu" or (
            ray_cfg.worker_device == "auto" and ray.cluster_resources().get("GPU", 0) >= n
        )
        bundle = {"CPU": ray_cfg.num_cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}
        bundles = [_pin(bundle, self.cfg.placement.nodes, rank, n) for rank in range(n)]
        self._pg = placement_group(bundles, strategy="PACK")
        _wait_for_placement_group(self._pg, bundles, ray_cfg.placement_timeout_s, self._cancel)
        seed = self.cfg.engine.seed if self.cfg.engine.seed is not None else int(torch.seed() % 2**63)
        actor = ray.remote(ExpertWorker)
        self.workers = [
            actor.options(
                num_cpus=bundle["CPU"],
                num_gpus=bundle.get("GPU", 0),
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self._pg, placement_group_bundle_index=rank
                ),
            ).remote(rank, self.cfg, model_dir, self._placement, seed)  # the same seed: ranks sample alike
            for rank in range(n)
        ]
        host, port = self._get(self.workers[0].master_address.remote(), ray_cfg.placement_timeout_s, self._cancel)
        setups = [w.setup.remote(host, port, self.num_kv_blocks) for w in self.workers]
        self._expert_bytes = self._get(setups, self.placement_timeout_s, self._cancel)  # loads the weights
        self._report()

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        ref = ray.put(sched)  # one copy in the object store, read by every worker
        reports: list[StepReport] = self._get([w.execute.remote(ref) for w in self.workers],
                                              self.cfg.ray.collective_timeout_s)
        self._report(tuple(r.step_s for r in reports), tuple(r.collective_s for r in reports))
        assert reports[0].output is not None, "rank 0 returns the step's output"
        return reports[0].output

    def _report(self, step_s: tuple[float, ...] = (), collective_s: tuple[float, ...] = ()) -> None:
        if self._on_stats is None:
            return
        try:
            self._on_stats(RankStats(self._shares, tuple(self._expert_bytes), step_s, collective_s, self.restarts))
        except Exception:  # telemetry must never fail a step (as the engine guards its own on_step hook)
            log.exception("the on_stats hook failed on the rank stats")

    def apply_placement(self, placement: Placement) -> None:
        """Move experts between workers to follow `placement` (same number of workers). Call between steps:
        requests keep running, and outputs do not change (each pair is still computed exactly once)."""
        if placement.workers != self._placement.workers:
            raise ConfigError(
                f"placement.workers={placement.workers}: the running group has {self._placement.workers} workers; "
                "changing the number of workers needs a restart"
            )
        cfg = self.model_config
        if (placement.num_layers, placement.num_experts) != (cfg.num_hidden_layers, cfg.num_local_experts):
            raise ConfigError(
                f"placement: {placement.num_layers} layers x {placement.num_experts} experts; the model has "
                f"{cfg.num_hidden_layers} x {cfg.num_local_experts}"
            )
        check_memory(placement, cfg, self.cfg.placement.memory_per_rank, self.dtype_name,
                     quantization=self.experts_format)
        refs = [w.apply_placement.remote(placement) for w in self.workers]
        self._expert_bytes = self._get(refs, self.placement_timeout_s)
        self._placement, self._shares = placement, placement.rank_shares()
        self._report()

    @property
    def placement(self) -> Placement:
        return self._placement

    def expert_bytes(self) -> list[int]:
        """Bytes of expert weights each worker holds, as the workers reported them."""
        return list(self._expert_bytes)

    def check_health(self) -> None:
        """Ping every worker (between steps, when idle); raises `EngineDeadError` if one is gone."""
        self._get([w.ping.remote() for w in self.workers], self.cfg.ray.collective_timeout_s)

    def restart(self) -> None:
        """Rebuild the worker group after a failure: new placement group, actors, process group and weights.

        The new workers hold no request state: the engine must have failed every in-flight request first.
        """
        self._release_workers()
        self.restarts += 1
        self._start(self.model_dir)

    def _get(self, refs, timeout_s: float, cancel: threading.Event | None = None):
        """`ray.get` that fails as soon as any worker fails (the others may be stuck in a collective
        waiting for it) and never waits longer than `timeout_s`. Raises `EngineDeadError`, or
        `StartupCancelled` once `cancel` is set (looked at every second)."""
        single = not isinstance(refs, list)
        pending, deadline = [refs] if single else list(refs), time.monotonic() + timeout_s
        try:
            while pending:
                if cancel is not None and cancel.is_set():
                    raise StartupCancelled(f"placement.workers={len(self.workers)}: start-up stopped while the "
                                           "workers started and loaded the model")
                left = max(deadline - time.monotonic(), 0)
                ready, pending = ray.wait(pending, num_returns=1, timeout=left if cancel is None else min(left, 1.0))
                if not ready and cancel is not None and time.monotonic() < deadline:
                    continue
                if not ready:
                    raise EngineDeadError(
                        f"Ray workers did not answer within {timeout_s:g} s (ray.collective_timeout_s / "
                        "ray.placement_timeout_s); check `ray status` and the worker logs"
                    )
                ray.get(ready[0])  # raises now if that worker failed
            return ray.get(refs)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise EngineDeadError(f"a Ray worker failed ({type(e).__name__}: {first})") from None

    def shutdown(self) -> None:
        """Release the workers; disconnect from Ray (stopping a local cluster) if this executor connected."""
        self._release_workers()
        if self._owns_ray:
            self._owns_ray = False
            ray.shutdown()

    def _release_workers(self) -> None:
        for w in self.workers:
            try:
                ray.kill(w)
            except Exception:  # already dead: nothing to release
                pass
        self.workers = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None


def _pin(bundle: dict[str, float], nodes: dict[int, str], rank: int, workers: int) -> dict[str, float]:
    """Rank `rank`'s bundle, with a sliver of the custom resource `placement.nodes` names for it: only
    nodes that declare that resource (`ray start --resources '{"moe-node-a": 1}'`) can host the rank."""
    for r in nodes:
        if not 0 <= r < workers:
            raise ConfigError(f"placement.nodes.{r}: rank {r} out of range; allowed: 0..{workers - 1}")
    return {**bundle, nodes[rank]: NODE_RESOURCE_SHARE} if rank in nodes else dict(bundle)


# How much of a node's custom resource one rank takes: any node declaring 1 of it fits 100 ranks.
NODE_RESOURCE_SHARE = 0.01


def _wait_for_placement_group(pg, bundles: list[dict[str, float]], timeout_s: float,
                              cancel: threading.Event | None = None) -> None:
    """Wait until every bundle is reserved, backing off; fail with what the cluster lacks, or stop when
    `cancel` is set (checked between waits, so within 10 s)."""
    bundle = {k: v for k, v in bundles[0].items() if k in ("CPU", "GPU")}  # what every rank needs
    count = len(bundles)
    deadline, delay = time.monotonic() + timeout_s, 0.5
    while time.monotonic() < deadline:
        ready, _ = ray.wait([pg.ready()], timeout=min(delay, max(deadline - time.monotonic(), 0.01)))
        if ready:
            return
        if cancel is not None and cancel.is_set():
            remove_placement_group(pg)
            raise StartupCancelled(f"placement.workers={len(bundles)}: start-up stopped while waiting for the "
                                   "workers' bundles")
        delay = min(delay * 2, 10.0)
    remove_placement_group(pg)
    have = ray.cluster_resources()
    need = ", ".join(f"{count} x {v:g} {k}" for k, v in bundle.items())
    pinned = sorted({k for b in bundles for k in b} - set(bundle))
    if pinned:
        need += f" (ranks pinned by placement.nodes to nodes with {', '.join(pinned)})"
    has = ", ".join(f"{have.get(k, 0):g} {k}" for k in (*bundle, *pinned))
    raise ConfigError(
        f"placement.workers={count}: need bundles of {need}; the cluster has {has} in total "
        f"(waited {timeout_s:g} s, ray.placement_timeout_s): check `ray status`, or lower placement.workers"
    )
