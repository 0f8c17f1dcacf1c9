"""`moe-runtime init-model --preset tiny|mini|tiny-trained|tiny-trained-draft|tiny-qwen3moe|tiny-qwen2moe|
tiny-olmoe [--seed N] [--force] OUT_DIR`: write an embedded checkpoint.

`tiny` and `mini` (Mixtral) and the `tiny-*` models of the other families (presets/configs.py) are generated
from the seed; `tiny-trained` and its draft model `tiny-trained-draft` are committed trained checkpoints (no
seed; presets/tiny_trained.py).
A directory that already holds a checkpoint is left alone unless `--force`, which first removes its
checkpoint files (so that no shard of the old one is left beside the new one) and nothing else.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moe_runtime.errors import ConfigError
from moe_runtime.presets.configs import PRESETS
from moe_runtime.presets.tiny_trained import TRAINED, write_trained

# What a checkpoint directory holds (checkpoint/files.py reads these): any of them means one is there.
CHECKPOINT_PATTERNS = ("config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                       "tokenizer_config.json")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init-model", help="write a seeded MoE checkpoint in HF format")
    p.add_argument("out_dir", help="directory to write (created)")
    p.add_argument("--preset", choices=[*sorted(PRESETS), *TRAINED], default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-bytes", type=int, default=None, help="split weights into shards of this size")
    p.add_argument("--force", action="store_true", help="replace the checkpoint already in OUT_DIR")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    prepare_out_dir(Path(args.out_dir), args.force)
    if args.preset in TRAINED:
        out = write_trained(args.preset, args.out_dir)
        print(f"wrote {args.preset} checkpoint (trained by bench/train_tiny.py) to {out}")
        return 0
    from moe_runtime.presets.init_model import init_model

    out = init_model(args.preset, args.out_dir, seed=args.seed, max_shard_bytes=args.max_shard_bytes)
    print(f"wrote {args.preset} checkpoint (seed {args.seed}) to {out}")
    return 0


def prepare_out_dir(out: Path, force: bool) -> None:
    """Refuse a file, and a directory holding a checkpoint unless `force` (then remove its checkpoint files)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: a file, not a directory; give a directory to write the checkpoint into")
    existing = sorted({f for pattern in CHECKPOINT_PATTERNS for f in out.glob(pattern)}) if out.is_dir() else []
    if existing and not force:
        names = ", ".join(f.name for f in existing[:4]) + (", ..." if len(existing) > 4 else "")
        raise ConfigError(f"{out}: already holds a checkpoint ({names}); pass --force to replace it, or give "
                          "another directory")
    for f in existing:
        f.unlink()
