"""`moe-runtime init-model --preset tiny|mini [--seed N] OUT_DIR`: write an embedded checkpoint."""

from __future__ import annotations

import argparse

from moe_runtime.model.presets import PRESETS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init-model", help="write a seeded Mixtral checkpoint in HF format")
    p.add_argument("out_dir", help="directory to write (created)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-bytes", type=int, default=None, help="split weights into shards of this size")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moe_runtime.model.init_model import init_model

    out = init_model(args.preset, args.out_dir, seed=args.seed, max_shard_bytes=args.max_shard_bytes)
    print(f"wrote {args.preset} checkpoint (seed {args.seed}) to {out}")
    return 0
