"""`moe-runtime plan-placement`: turn measured expert load into a balanced placement YAML.

    moe-runtime plan-placement --stats stats.json --workers 4 --redundant 4 -o placement.yaml
    moe-runtime plan-placement --stats stats.json --workers 16 --nodes 2 --redundant 8 -o placement.yaml

The stats file is what `moe-runtime stats --json` writes (format in `moe_runtime.cluster.expert_load`). The
output holds one `placement:` section: merge it into a preset or pass it where a placement YAML is read.
With `--nodes M`, ranks 0..N/M-1 form node 0 and so on, and every copy of an expert stays on one node
(`moe_runtime.cluster.planner`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pydantic import ValidationError

from moe_runtime.config import ModelConfig, PlacementConfig
from moe_runtime.errors import ConfigError

NAME = "plan-placement"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME,
        help="plan a balanced expert placement from measured load",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--stats", required=True, type=Path, help="stats JSON from `moe-runtime stats --json`"
    )
    parser.add_argument("--workers", required=True, type=int, help="number of workers (ranks)")
    parser.add_argument(
        "--redundant",
        type=int,
        default=0,
        help="extra expert copies per layer, given to the hottest (default 0)",
    )
    parser.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="nodes the workers span, N/nodes each: balance nodes first, keep an expert's copies on one node "
        "(default 1)",
    )
    parser.add_argument("-o", "--output", required=True, type=Path, help="placement YAML to write")
    parser.add_argument(
        "--model", type=Path, help="checkpoint directory or config.json, to check memory per rank"
    )
    parser.add_argument("--memory-per-rank", help="weight budget per rank, e.g. 24GiB (needs --model)")
    parser.add_argument(
        "--dtype", default="auto", help="weight dtype for the memory check (default: the model's)"
    )
    parser.add_argument(
        "--quantization", default="none", choices=["none", "int8", "fp8"],
        help="the experts' format for the memory check (model.quantization; default: 16-bit experts)",
    )
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    # torch: only when the command runs
    from moe_runtime.cluster.expert_load import parse_stats
    from moe_runtime.cluster.placement_config import placement_to_yaml
    from moe_runtime.cluster.placement_memory import check_memory, rank_bytes
    from moe_runtime.cluster.planner import plan_placement

    load = parse_stats(_read_json(args.stats, "--stats"), str(args.stats))  # [L, E]
    budget = _parse_budget(args.memory_per_rank)
    model = _read_model(args.model) if args.model else None
    if budget is not None and model is None:
        raise ConfigError("--memory-per-rank needs --model (a checkpoint directory or its config.json)")
    if model is not None and list(load.shape) != [model.num_hidden_layers, model.num_local_experts]:
        raise ConfigError(
            f"{args.stats}: load is {load.shape[0]} layers x {load.shape[1]} experts but {args.model} has "
            f"{model.num_hidden_layers} x {model.num_local_experts}; use stats from the same model"
        )
    plan, report = plan_placement(load, args.workers, args.redundant, num_nodes=args.nodes)
    if model is not None:
        check_memory(plan, model, budget, args.dtype, where=f"{args.output}: placement",
                     quantization=args.quantization)
    header = (
        f"# moe-runtime plan-placement --stats {args.stats} --workers {args.workers} --nodes {args.nodes} "
        f"--redundant {args.redundant}\n"
        f"# predicted max/mean rank load: {report.imbalance_before:.3f} (round-robin) -> "
        f"{report.imbalance_after:.3f}; worst layer {report.worst_layer_before:.3f} -> {report.worst_layer_after:.3f}\n"
    )
    args.output.write_text(header + placement_to_yaml(plan, budget))
    used = int(plan.replica_counts().sum()) - plan.num_layers * plan.num_experts
    print(
        f"planned {plan.num_layers} layers x {plan.num_experts} experts on {plan.workers} workers"
        f"{f' in {args.nodes} nodes' if args.nodes > 1 else ''}, "
        f"{used} of {args.redundant * plan.num_layers} redundant copies used -> {args.output}"
    )
    print(
        f"predicted max/mean rank load: {report.imbalance_before:.3f} -> {report.imbalance_after:.3f} "
        f"(worst layer {report.worst_layer_before:.3f} -> {report.worst_layer_after:.3f})"
    )
    print("expert copies per rank:", plan.experts_per_rank().sum(dim=0).tolist())
    if model is not None:
        print("weight GiB per rank:", [round(b / 2**30, 2) for b in rank_bytes(plan, model, args.dtype, args.quantization)])
    return 0


def _read_json(path: Path, flag: str) -> object:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        hint = f"; write it with `moe-runtime stats --json > {path}`" if flag == "--stats" else ""
        raise ConfigError(f"{flag} {path}: not found{hint}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag} {path}: not valid JSON ({e})") from None


def _read_model(path: Path) -> ModelConfig:
    if path.is_dir():
        return ModelConfig.from_pretrained(path)
    hf = _read_json(path, "--model")
    if not isinstance(hf, dict):
        raise ConfigError(f"--model {path}: expected a config.json object")
    return ModelConfig.from_hf(hf, str(path))


def _parse_budget(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return PlacementConfig(memory_per_rank=value).memory_per_rank
    except ValidationError as e:
        raise ConfigError(f"--memory-per-rank={value!r}: {e.errors()[0]['msg']}") from None
