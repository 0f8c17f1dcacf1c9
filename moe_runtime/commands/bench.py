"""`moe-runtime bench serve`: load a running `moe-runtime serve` and report throughput, latency and cost.

    moe-runtime bench serve --server HOST:PORT [--protocol grpc|http] (--rate R | --concurrency C)
        [--num-requests N] [--prompt-len SPEC] [--output-len SPEC] [--shared-prefix-tokens N] [--seed S]
        [--slo-ttft-ms MS] [--slo-tpot-ms MS] [--usd-per-hour USD] [--warmup N] [--json]

Length SPECs: `fixed:N`, `uniform:LOW:HIGH`, `normal:MEAN:STD` (tokens). `--rate` is open loop (Poisson
arrivals, `inf` sends everything at once); `--concurrency` closed loop (C requests in flight). The report:
requests/s, prompt and generated tokens/s, TTFT, TPOT, ITL and end-to-end latency (mean, p50, p90, p99),
goodput under the SLOs given, cost per million tokens at `--usd-per-hour`. `--json` prints it as one JSON
object (for CI). The bearer token comes from MOE_RUNTIME_AUTH_TOKEN. Exit 1 when any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
from typing import Any

from moe_runtime.errors import ConfigError


def _positive(kind: type) -> Any:
    def parse(value: str) -> Any:
        try:
            x = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r}: expected a {kind.__name__}") from None
        if not x > 0:
            raise argparse.ArgumentTypeError(f"{value!r}: must be > 0")
        return x

    return parse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark a running server", description="Benchmarks against a running "
                       "`moe-runtime serve`.")
    bench = p.add_subparsers(dest="bench_command", required=True, parser_class=type(p))
    s = bench.add_parser("serve", help="serving benchmark: throughput, TTFT/TPOT/ITL percentiles, goodput, cost",
                         description=__doc__.split("\n\n")[0])
    s.add_argument("--server", required=True, metavar="HOST:PORT", help="the gRPC or HTTP address to load")
    s.add_argument("--protocol", choices=("grpc", "http"), default="grpc",
                   help="gRPC GenerateStream, or the OpenAI-compatible /v1/completions (default grpc)")
    load = s.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=_positive(float), help="open loop: requests per second (Poisson), or inf")
    load.add_argument("--concurrency", type=_positive(int), help="closed loop: requests in flight")
    s.add_argument("--num-requests", type=_positive(int), default=100, help="requests measured (default 100)")
    s.add_argument("--prompt-len", default="fixed:128", metavar="SPEC", help="prompt tokens (default fixed:128)")
    s.add_argument("--output-len", default="fixed:128", metavar="SPEC", help="tokens to generate (default fixed:128)")
    s.add_argument("--shared-prefix-tokens", type=int, default=0, metavar="N",
                   help="every prompt starts with the same N tokens (prefix caching), before its --prompt-len")
    s.add_argument("--seed", type=int, default=0, help="the workload and arrivals (default 0)")
    s.add_argument("--temperature", type=float, default=0.0, help="default 0 (greedy)")
    s.add_argument("--stop-at-eos", action="store_true", help="let EOS end outputs early (default: ignore EOS, so "
                   "output lengths follow --output-len)")
    s.add_argument("--warmup", type=int, default=0, metavar="N", help="requests sent first and not reported")
    s.add_argument("--slo-ttft-ms", type=_positive(float), help="goodput: TTFT at most this")
    s.add_argument("--slo-tpot-ms", type=_positive(float), help="goodput: TPOT at most this")
    s.add_argument("--usd-per-hour", type=_positive(float), help="price of the machine: report cost per 1M tokens")
    s.add_argument("--tls-ca", help="PEM CA certificate: connect with TLS")
    s.add_argument("--timeout", type=_positive(float), default=600.0, help="seconds per request (default 600)")
    s.add_argument("--json", action="store_true", help="print the report as one JSON object")
    s.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moe_runtime.bench.report import make_report
    from moe_runtime.bench.workload import LengthDist, make_workload

    try:
        prompt_len = LengthDist.parse(args.prompt_len, "--prompt-len")
        output_len = LengthDist.parse(args.output_len, "--output-len")
        # One workload, warm-up requests first: they share the measured requests' prefix (a warm server has
        # it cached, as in steady state) and never repeat one of their prompts.
        if args.num_requests < 1 or args.warmup < 0:
            raise ValueError(f"--num-requests={args.num_requests}, --warmup={args.warmup}: allowed: "
                             "--num-requests >= 1, --warmup >= 0")
        every = make_workload(args.warmup + args.num_requests, prompt_len, output_len, args.shared_prefix_tokens,
                              args.seed)
        warmup = every[:args.warmup]
        items = [dataclasses.replace(item, index=i) for i, item in enumerate(every[args.warmup:])]
    except ValueError as e:
        raise ConfigError(str(e)) from None
    results, duration = asyncio.run(_run(args, items, warmup))
    report = make_report(results, duration, args.slo_ttft_ms, args.slo_tpot_ms, args.usd_per_hour)
    report["config"] = {
        "server": args.server, "protocol": args.protocol, "rate": args.rate, "concurrency": args.concurrency,
        "num_requests": args.num_requests, "prompt_len": str(prompt_len), "output_len": str(output_len),
        "shared_prefix_tokens": args.shared_prefix_tokens, "seed": args.seed, "temperature": args.temperature,
        "stop_at_eos": args.stop_at_eos, "warmup": args.warmup,
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        from moe_runtime.bench.render import render

        render(report)
    return 1 if report["requests"]["failed"] else 0


async def _run(args: argparse.Namespace, items: list, warmup: list) -> tuple[list, float]:
    from moe_runtime.bench.runner import run as run_load
    from moe_runtime.bench.targets import GrpcTarget, HttpTarget

    target_class = GrpcTarget if args.protocol == "grpc" else HttpTarget
    target = target_class(args.server, args.env.get("auth_token"), args.tls_ca, args.temperature, args.stop_at_eos,
                          args.timeout)
    async with target:
        return await run_load(target.send, items, rate=args.rate, concurrency=args.concurrency, warmup=warmup,
                              seed=args.seed)
