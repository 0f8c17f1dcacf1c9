"""`moe-runtime` command line. Each subcommand lives in `moe_runtime.commands.<name>` and exposes
`add_parser(subparsers)` and `run(args) -> int`. Errors are one clear line and a non-zero exit, never a
traceback: usage errors exit 2, runtime errors (bad config, bad checkpoint, server errors) exit 1.

This is the only module that reads environment variables (see `env_defaults`), and the only one that sets
one: grpc's log verbosity, before grpc is imported.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from moe_runtime.errors import ConfigError, MoeRuntimeError

COMMANDS = ("init_model", "generate", "serve", "stats", "plan_placement", "apply_placement", "info", "bench", "cache")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line (and exits 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def env_defaults() -> dict[str, str | None]:
    """Environment the CLI honours: the cache dir for the embedded model, and the server auth token.

    MOE_RUNTIME_AUTH_TOKEN unset means no auth; set, it must be a usable token. An empty one (a secret
    that failed to load) is an error, not a server without auth.
    """
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    token = os.environ.get("MOE_RUNTIME_AUTH_TOKEN")
    if token is not None and not _valid_token(token):
        shown = "empty" if not token else "has characters other than visible ASCII (spaces, control, non-ASCII)"
        raise ConfigError(f"MOE_RUNTIME_AUTH_TOKEN is set but {shown}; allowed: visible ASCII without spaces, "
                          "e.g. from `openssl rand -hex 32`, or unset it to run without auth")
    return {
        "cache_dir": os.environ.get("MOE_RUNTIME_CACHE", str(Path(xdg) / "moe-runtime")),
        "auth_token": token,
    }


def _valid_token(token: str) -> bool:
    """A token that fits `authorization: Bearer <token>` metadata: visible ASCII, no spaces."""
    return bool(token) and all("!" <= c <= "~" for c in token)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="moe-runtime", description="Serve Mixture-of-Experts language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name in COMMANDS:
        module = importlib.import_module(f"moe_runtime.commands.{name}")
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # grpc's C core logs each failed TLS handshake at INFO on stderr: one line per bad client on a server, and
    # noise around the CLI's own one-line error. Its errors still show.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    args = build_parser().parse_args(argv)
    try:
        args.env = env_defaults()
        return int(args.run(args) or 0)
    except MoeRuntimeError as e:
        print(f"moe-runtime {args.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a file or socket the command needed: the OS's reason names it
        print(f"moe-runtime {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
