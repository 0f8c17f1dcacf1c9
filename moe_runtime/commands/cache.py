"""`moe-runtime cache`: what moe-runtime keeps on disk between starts, and deleting what no start will read.

    moe-runtime cache                        # list: quantized spill files (with their checkpoint), CPU plans
    moe-runtime cache prune                  # delete stale spill files and interrupted builds
    moe-runtime cache prune --all            # every spill file (the next start builds what it needs again)
    moe-runtime cache prune --dry-run        # say what would go, delete nothing

Quantized spill files (offload/spill.py) are the big ones: a whole model's experts in 8 bits (~45 GB for
Mixtral-8x7B), one per checkpoint and scheme. A changed or removed checkpoint leaves its file behind, since
a start only ever builds the file it needs; `prune` deletes those, and temporary files of builds that were
interrupted. A file being built by a live process is never deleted. The directories are the configured ones
(`offload.spill_dir`, `engine.cpu_plan_dir`; `--config` / `--set` as for `serve`), else the defaults. The
measured CPU plans are listed (a few KB each; a stale one is simply never read) but not pruned.
"""

from __future__ import annotations

import argparse

NAME = "cache"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME, help="list moe-runtime's on-disk caches; prune quantized spill files no start reads",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("action", nargs="?", default="list", choices=["list", "prune"])
    p.add_argument("--all", action="store_true", help="prune: every spill file, not only stale ones")
    p.add_argument("--dry-run", action="store_true", help="prune: say what would be deleted, delete nothing")
    p.add_argument("--config", default=None, help="YAML config file (for offload.spill_dir, engine.cpu_plan_dir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.set_defaults(run=run, parser=p)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moe_runtime.config import load_config
    from moe_runtime.engine.parts import plan_dir
    from moe_runtime.offload import spill

    if args.action == "list" and (args.all or args.dry_run):
        args.parser.error("--all and --dry-run go with `prune`")
    cfg = load_config(args.config, args.overrides)
    spill_dir = Path(cfg.offload.spill_dir) if cfg.offload.spill_dir else spill.DEFAULT_DIR
    files = spill.list_spills(spill_dir)
    if args.action == "prune":
        states = tuple(spill.SpillState) if args.all else spill.PRUNED
        chosen = [f for f in files if f.state in states and f.state is not spill.SpillState.BUILDING]
        gone = chosen if args.dry_run else spill.prune(files, states)
        verb = "would delete" if args.dry_run else "deleted"
        for f in gone:
            print(f"{verb} {f.path} ({_gb(f.nbytes)}, {_state(f)})")
        kept = len(files) - len(gone)
        print(f"{verb} {len(gone)} spill file(s), {_gb(sum(f.nbytes for f in gone))}; {kept} kept in {spill_dir}")
        return 0
    print(f"quantized spill files in {spill_dir}: {len(files)}, {_gb(sum(f.nbytes for f in files))}")
    for f in files:
        origin = f" {f.scheme} from {f.checkpoint}" if f.checkpoint else ""
        print(f"  {f.path.name}  {_gb(f.nbytes)}{origin}  {_state(f)}")
    pruned = [f for f in files if f.state in spill.PRUNED]
    if pruned:
        print(f"  `moe-runtime cache prune` deletes the {len(pruned)} stale or partial one(s), "
              f"{_gb(sum(f.nbytes for f in pruned))}")
    plans = sorted(plan_dir(cfg.engine).glob("cpu-plan-*.json")) if plan_dir(cfg.engine).is_dir() else []
    print(f"CPU kernel plans in {plan_dir(cfg.engine)}: {len(plans)}, "
          f"{sum(p.stat().st_size for p in plans) / 1e3:.1f} KB")
    return 0


def _state(f) -> str:
    return f.state.value + (f": {f.why}" if f.why else "")


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e7 else f"{nbytes / 1e6:.2f} MB"
