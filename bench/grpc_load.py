"""What serving costs: the `moe-runtime bench serve` load (moe_runtime.bench) against `moe-runtime serve` over
gRPC and over its OpenAI-compatible HTTP API, and the same load through the in-process `AsyncEngine`.

    python bench/grpc_load.py                      # tiny model, N = 1, 8, 64 closed-loop clients
    python bench/grpc_load.py --model DIR --clients 1,8 --output-len 64 --json out.json

The server runs as `moe-runtime serve` in a subprocess (its own interpreter, as deployed); the in-process
baseline runs in a fresh interpreter too. Each of N clients sends `--requests-per-client` requests one after
another (prompt `--prompt-len` token ids, `--output-len` tokens, greedy, EOS ignored). Each level runs
`--repeat` times and the table shows the run with the median generated tok/s, and its ratio to in-process.
For one server and other loads (request rate, length distributions, SLOs, cost) use `moe-runtime bench serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from moe_runtime.bench.report import RequestResult, make_report
from moe_runtime.bench.runner import closed_loop
from moe_runtime.bench.targets import GrpcTarget, HttpTarget
from moe_runtime.bench.workload import LengthDist, WorkItem, make_workload

COLUMNS = ("clients", "mode", "requests", "failed", "tok_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms",
           "tpot_p99_ms", "vs_in_process")


class InProcessTarget:
    """The bench target interface (`send`) on an `AsyncEngine` in this process: the baseline."""

    def __init__(self, engine):
        self.engine = engine
        self.count = 0

    async def send(self, item: WorkItem) -> RequestResult:
        from moe_runtime.engine import SamplingParams

        self.count += 1
        params = SamplingParams(max_tokens=item.max_tokens, ignore_eos=True, temperature=0)
        result = RequestResult(prompt_tokens=len(item.prompt_token_ids), start_s=time.perf_counter())
        async for out in self.engine.generate(f"bench-{self.count}", item.prompt_token_ids, params):
            if out.new_token_ids:
                result.token_times.append(time.perf_counter())
            result.output_tokens = out.num_output_tokens
        result.end_s = time.perf_counter()
        return result


def row(mode: str, clients: int, report: dict) -> dict:
    return {"mode": mode, "clients": clients, "requests": report["requests"]["completed"],
            "failed": report["requests"]["failed"], "tok_per_s": round(report["throughput"]["generated_tokens_per_s"], 1),
            **{f"{k}_{p}_ms": round(report[f"{k}_ms"][p] or 0.0, 2) for k in ("ttft", "tpot") for p in ("p50", "p99")}}


async def measure(send, mode: str, levels: list[int], args: argparse.Namespace) -> dict[int, dict]:
    """Per level, the run with the median throughput (the machine is shared: single runs are noisy)."""
    prompt, output = LengthDist.parse(args.prompt_len, "--prompt-len"), LengthDist.parse(args.output_len, "--output-len")
    await closed_loop(send, make_workload(2, prompt, LengthDist.parse("fixed:4", "warm-up")), 2)  # warm-up
    rows = {}
    for n in levels:
        runs = []
        for r in range(args.repeat):
            items = make_workload(n * args.requests_per_client, prompt, output, seed=r)
            runs.append(row(mode, n, make_report(*await closed_loop(send, items, n))))
        runs.sort(key=lambda x: x["tok_per_s"])
        rows[n] = {**runs[len(runs) // 2], "tok_per_s_all": [x["tok_per_s"] for x in runs]}
    return rows


async def served(address: str, http_address: str, levels: list[int], args) -> dict[str, dict[int, dict]]:
    async with GrpcTarget(address) as grpc_target, HttpTarget(http_address) as http_target:
        return {"gRPC": await measure(grpc_target.send, "gRPC", levels, args),
                "HTTP": await measure(http_target.send, "HTTP", levels, args)}


async def in_process(model_dir: Path, levels: list[int], args) -> dict[int, dict]:
    from moe_runtime.config import load_config
    from moe_runtime.engine import AsyncEngine, LLMEngine

    engine = AsyncEngine(LLMEngine(load_config(overrides=[f"model.path={model_dir}", *args.set])))
    await engine.start()
    try:
        return await measure(InProcessTarget(engine).send, "in-process", levels, args)
    finally:
        await engine.shutdown()


def start_server(model_dir: Path, overrides: list[str]) -> tuple[subprocess.Popen, str, str]:
    cmd = [sys.executable, "-m", "moe_runtime.cli", "serve", "--model", str(model_dir), "--port", "0",
           "--metrics-port", "0", "--set", "server.http_port=0"]
    for item in overrides:
        cmd += ["--set", item]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    found: dict[str, str] = {}
    ready = threading.Event()

    def read() -> None:  # keeps draining stderr (one log line per request) after the addresses are found
        for line in proc.stderr:
            if m := re.search(r"serving on (\S+:\d+)", line):
                found["grpc"] = m.group(1)
            if m := re.search(r"HTTP API on http://(\S+:\d+)/v1", line):
                found["http"] = m.group(1)
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(300) or len(found) != 2:
        proc.kill()
        raise SystemExit("server did not start")
    return proc, found["grpc"], found["http"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="checkpoint dir (default: a fresh tiny preset)")
    ap.add_argument("--clients", default="1,8,64")
    ap.add_argument("--requests-per-client", type=int, default=4, help="requests per client, one after another")
    ap.add_argument("--prompt-len", default="fixed:16", metavar="SPEC")
    ap.add_argument("--output-len", default="fixed:32", metavar="SPEC")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="config overrides for both sides (after cache.num_blocks=2048, engine.max_num_seqs=64)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per level; the median-throughput run is shown")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--in-process-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.set = ["cache.num_blocks=2048", "engine.max_num_seqs=64", *args.set]
    levels = [int(n) for n in args.clients.split(",")]
    if args.in_process_worker:
        print(json.dumps(asyncio.run(in_process(args.model, levels, args))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from moe_runtime.presets.init_model import init_model

            model_dir = init_model("tiny", Path(tmp) / "tiny", seed=0)
        proc, address, http_address = start_server(model_dir, args.set)
        try:
            modes = asyncio.run(served(address, http_address, levels, args))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        worker = [sys.executable, __file__, "--in-process-worker", "--model", str(model_dir)] + sys.argv[1:]
        local = {int(k): v for k, v in json.loads(subprocess.run(worker, check=True, capture_output=True,
                                                                 text=True).stdout).items()}
    rows = []
    for n in levels:
        rows.append(local[n])
        for mode in modes.values():
            base = local[n]["tok_per_s"]
            rows.append({**mode[n], "vs_in_process": round(mode[n]["tok_per_s"] / base, 2) if base else ""})
    print(f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.requests_per_client} requests "
          f"per client, prompts {args.prompt_len}, outputs {args.output_len}; median of {args.repeat} runs")
    print(" | ".join(COLUMNS))
    print(" | ".join("---" for _ in COLUMNS))
    for r in rows:
        print(" | ".join(str(r.get(c, "")) for c in COLUMNS))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
