"""`moe-runtime apply-placement --server HOST:PORT placement.yaml`: move experts on a running Ray server.

    moe-runtime stats --server 127.0.0.1:50051 --json > stats.json
    moe-runtime plan-placement --stats stats.json --workers 2 --redundant 2 -o placement.yaml
    moe-runtime apply-placement --server 127.0.0.1:50051 placement.yaml

The server checks the placement against its model and memory budget, then moves experts between its
workers between two engine steps: in-flight requests keep running, with the same outputs. Servers with
auth take the token from MOE_RUNTIME_AUTH_TOKEN. A server on the local executor answers
FAILED_PRECONDITION.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moe_runtime.errors import ConfigError

NAME = "apply-placement"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME, help="move experts on a running Ray server to follow a placement YAML",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("placement", type=Path, help="YAML with a `placement:` section (plan-placement -o writes one)")
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="gRPC address, e.g. 127.0.0.1:50051")
    p.add_argument("--tls-ca", help="PEM CA certificate: connect with TLS")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds (default 300: reading experts)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moe_runtime.server.client import GenerationClient

    try:
        text = args.placement.read_text()
    except OSError as e:
        raise ConfigError(f"{args.placement}: cannot read ({e.strerror})") from None
    with GenerationClient(args.server, args.env.get("auth_token"), args.tls_ca, args.timeout) as client:
        resp = client.apply_placement(text)
    per_rank = ", ".join(f"rank {r}: {b / 2**20:.1f} MiB" for r, b in enumerate(resp.expert_bytes))
    print(f"applied {args.placement} on {resp.workers} workers in {resp.seconds:.2f} s; expert weights {per_rank}")
    return 0
