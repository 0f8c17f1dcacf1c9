"""`moe-runtime` command line. Each subcommand lives in `moe_runtime.commands.<name>` and exposes
`add_parser(subparsers)` and `run(args) -> int`. Errors are one clear line and a non-zero exit, never a
traceback: usage errors exit 2, runtime errors (bad config, bad checkpoint, server errors) exit 1.

This is the only module that reads environment variables (see `env_defaults`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from moe_runtime.errors import MoeRuntimeError

COMMANDS = ("init_model", "generate", "serve", "stats", "plan_placement", "apply_placement")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line (and exits 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def env_defaults() -> dict[str, str | None]:
    """Environment the CLI honours: the cache dir for the embedded model, and the server auth token."""
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return {
        "cache_dir": os.environ.get("MOE_RUNTIME_CACHE", str(Path(xdg) / "moe-runtime")),
        "auth_token": os.environ.get("MOE_RUNTIME_AUTH_TOKEN"),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="moe-runtime", description="Serve Mixture-of-Experts language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name in COMMANDS:
        module = importlib.import_module(f"moe_runtime.commands.{name}")
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.env = env_defaults()
    try:
        return int(args.run(args) or 0)
    except MoeRuntimeError as e:
        print(f"moe-runtime {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
