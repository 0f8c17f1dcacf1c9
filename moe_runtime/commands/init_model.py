"""`moe-runtime init-model --preset tiny|mini|tiny-trained [--seed N] OUT_DIR`: write an embedded checkpoint.

`tiny` and `mini` are generated from the seed; `tiny-trained` is the committed trained checkpoint (no seed).
"""

from __future__ import annotations

import argparse

from moe_runtime.presets.configs import PRESETS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init-model", help="write a seeded Mixtral checkpoint in HF format")
    p.add_argument("out_dir", help="directory to write (created)")
    p.add_argument("--preset", choices=[*sorted(PRESETS), "tiny-trained"], default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-bytes", type=int, default=None, help="split weights into shards of this size")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.preset == "tiny-trained":
        from moe_runtime.presets.tiny_trained import write_tiny_trained

        print(f"wrote tiny-trained checkpoint (trained by bench/train_tiny.py) to {write_tiny_trained(args.out_dir)}")
        return 0
    from moe_runtime.presets.init_model import init_model

    out = init_model(args.preset, args.out_dir, seed=args.seed, max_shard_bytes=args.max_shard_bytes)
    print(f"wrote {args.preset} checkpoint (seed {args.seed}) to {out}")
    return 0
