"""`moe-runtime serve [--config YAML] [--model DIR] [--host H] [--port P] [--metrics-port M]`.

Serves `moe_runtime.v1.GenerationService` over gRPC and Prometheus `/metrics`. With no model (neither
`--model` nor `model.path` in the config) it serves the embedded `tiny` model, created in the user cache on
first run. The bearer token comes from MOE_RUNTIME_AUTH_TOKEN (read in cli.py); unset: no auth; set but
empty: an error. SIGTERM/Ctrl-C drains (server.drain_grace_s); a second one exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging

from moe_runtime.config import RuntimeConfig, load_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over gRPC with Prometheus metrics",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML preset (configs/*.yaml); default: built-in defaults")
    p.add_argument("--model", help="HF Mixtral checkpoint directory (overrides model.path)")
    p.add_argument("--host", help="gRPC bind address (server.host, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="gRPC port (server.port, default 50051; 0 picks a free one)")
    p.add_argument("--metrics-port", type=int, help="/metrics port (telemetry.metrics_port, default 9400)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set engine.max_num_seqs=8 (repeatable)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(run=run)


def resolve_config(args: argparse.Namespace) -> RuntimeConfig:
    """The config file, then --set, then the flags; the embedded model when no model path is given."""
    overrides = list(args.set)
    for flag, key in ((args.model, "model.path"), (args.host, "server.host"), (args.port, "server.port"),
                      (args.metrics_port, "telemetry.metrics_port")):
        if flag is not None:
            overrides.append(f"{key}={json.dumps(flag)}")  # JSON is YAML: quoted paths stay strings
    cfg = load_config(args.config, overrides)
    if cfg.model.path is None:
        from moe_runtime.presets.default_model import ensure_default_model

        path = ensure_default_model(args.env["cache_dir"])
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": str(path)})})
    return cfg


def run(args: argparse.Namespace) -> int:
    from moe_runtime.server.app import serve

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = resolve_config(args)
    asyncio.run(serve(cfg, auth_token=args.env.get("auth_token")))
    return 0
