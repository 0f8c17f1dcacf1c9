"""Cluster overhead: RayExecutor (2 and 4 workers) vs LocalExecutor, same checkpoint, same process, same run.

    .venv/bin/python bench/cluster.py                          # tiny, batches 1 and 16, 2 and 4 workers
    .venv/bin/python bench/cluster.py --preset mini --workers 2 --batches 1,16 --max-tokens 32

Workload: prompts of 32 random token ids, `--max-tokens` new tokens, greedy, `ignore_eos`. tok/s counts
generated tokens over the wall time of `generate`; per-step overhead is (Ray step time - local step time).
Placements: `balanced` is planned from the router counts of the local run (`plan_placement`), `skewed`
puts every layer's hottest experts on rank 0; for each the predicted max/mean rank load (from the measured
router counts of a planning pass) and the measured one (the run's own routing, summed over its steps, on
that placement) are printed beside the speed. On a CPU host the workers share the same cores as the
local run and add a process group, so the numbers show the executor's overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from moe_runtime.cluster.expert_load import imbalance
from moe_runtime.cluster.placement import Placement
from moe_runtime.cluster.planner import plan_placement
from moe_runtime.config import load_config
from moe_runtime.engine.llm_engine import LLMEngine
from moe_runtime.engine.sampling_params import SamplingParams
from moe_runtime.kernels.attention import AttentionMetadata


def run(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> tuple[float, int, int, torch.Tensor]:
    """(seconds, generated tokens, steps, routed pairs [L, E]) of running all prompts together."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    engine._num_generate_calls += 1
    for i, prompt in enumerate(prompts):
        engine.add_request(f"bench-{engine._num_generate_calls}-{i}", prompt, params)
    steps0, generated, routed, t0 = engine.num_steps, 0, 0, time.perf_counter()
    while engine.has_unfinished():
        generated += sum(len(out.new_token_ids) for out in engine.step())
        routed = routed + engine.make_stats().router_counts.double()  # [L, E], the step's routing
    return time.perf_counter() - t0, generated, engine.num_steps - steps0, routed


def router_load(model, prompts: list[list[int]]) -> torch.Tensor:
    """Tokens routed to each expert when the prompts run through the model once. Returns [L, E] float64."""
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    model(ids, positions, AttentionMetadata.for_prompts([len(p) for p in prompts]))
    return model.router_counts(len(ids)).double()


def skewed(load: torch.Tensor, workers: int) -> Placement:
    """Per layer, the hottest E/N experts on rank 0, the next E/N on rank 1, ... (worst contiguous)."""
    num_layers, num_experts = load.shape
    layers = []
    for layer in range(num_layers):
        order = torch.argsort(load[layer], descending=True, stable=True).tolist()
        ranks = [0] * num_experts
        for i, e in enumerate(order):
            ranks[e] = i * workers // num_experts
        layers.append(tuple((r,) for r in ranks))
    return Placement(workers, tuple(layers))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", choices=("tiny", "mini"))
    ap.add_argument("--model", type=Path, help="checkpoint directory (default: create the preset in /tmp)")
    ap.add_argument("--workers", default="2,4")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    model_dir = args.model or Path(f"/tmp/moe-runtime-bench-{args.preset}")
    if not (model_dir / "config.json").exists():
        from moe_runtime.presets.init_model import init_model

        init_model(args.preset, model_dir, seed=0)
    # one torch thread everywhere: Ray gives a 1-CPU actor OMP_NUM_THREADS=1, so the local run gets the same
    base = [
        f"model.path={model_dir}",
        "engine.seed=0",
        "cache.num_blocks=512",
        "model.device=cpu",
        "engine.num_threads=1",
    ]
    g = torch.Generator().manual_seed(0)
    batches = [int(b) for b in args.batches.split(",")]
    prompt_sets = {b: [torch.randint(3, 500, (32,), generator=g).tolist() for _ in range(b)] for b in batches}

    local = LLMEngine(load_config(overrides=base))
    run(local, prompt_sets[batches[0]], 2)  # warm-up
    rows = []
    for b in batches:
        s, n, steps, _ = run(local, prompt_sets[b], args.max_tokens)
        rows.append(("local", "-", b, n / s, 1e3 * s / steps, "-", "-"))
    load = router_load(local.executor.model, prompt_sets[max(batches)])  # [L, E]
    local.executor.shutdown()
    local_step_ms = {r[2]: r[4] for r in rows}

    import ray

    from moe_runtime.cluster.ray_executor import RayExecutor

    ray.init(
        num_cpus=max(int(w) for w in args.workers.split(",")), include_dashboard=False, log_to_driver=False
    )
    try:
        for workers in (int(w) for w in args.workers.split(",")):
            planned, _ = plan_placement(load, workers, redundant=0)
            for name, placement in (("balanced", planned), ("skewed", skewed(load, workers))):
                cfg = load_config(
                    overrides=[
                        *base,
                        "executor=ray",
                        f"placement.workers={workers}",
                        "ray.worker_device=cpu",
                        "ray.collective_timeout_s=600",
                    ]
                )
                executor = RayExecutor(cfg, str(model_dir))
                executor.apply_placement(placement)
                engine = LLMEngine(cfg, executor=executor)
                run(engine, prompt_sets[batches[0]], 2)  # warm-up
                predicted = imbalance(load, placement)[0]
                for b in batches:
                    s, n, steps, routed = run(engine, prompt_sets[b], args.max_tokens)
                    measured = imbalance(routed, placement)[0]  # the run's own routing on this placement
                    rows.append((f"ray x{workers}", name, b, n / s, 1e3 * s / steps, f"{predicted:.2f}",
                                 f"{measured:.2f}"))
                executor.shutdown()
    finally:
        ray.shutdown()

    print("| executor | placement | batch | tok/s | ms/step | overhead ms/step | predicted max/mean | measured max/mean |")
    print("|---|---|---|---|---|---|---|---|")
    for ex, name, b, tps, ms, pred, meas in rows:
        over = "-" if ex == "local" else f"{ms - local_step_ms[b]:+.1f}"
        print(f"| {ex} | {name} | {b} | {tps:.1f} | {ms:.1f} | {over} | {pred} | {meas} |")
    print(
        f"\n{args.preset}, {args.max_tokens} new tokens per prompt, prompts of 32 tokens, "
        f"{os.cpu_count()} CPUs shared by the local run and the workers"
    )


if __name__ == "__main__":
    main()
