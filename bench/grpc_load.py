"""gRPC load: N concurrent streaming clients against a real server on loopback, some cancelling mid-stream,
and the same load through the in-process `AsyncEngine`, to show what the server costs.

    python bench/grpc_load.py                      # tiny model, N = 1, 8, 64
    python bench/grpc_load.py --model DIR --clients 1,8 --max-tokens 64 --json out.json

The server runs as `moe-runtime serve` in a subprocess (its own interpreter, as deployed); the clients use
`grpc.aio` in this process. Each client sends `--rounds` requests one after another; every
`1/--cancel-every`-th request is cancelled after half its tokens. TTFT is measured by the client (send ->
first token), time per output token over the tokens after the first, throughput counts tokens received.
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
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from moe_runtime.config import load_config
from moe_runtime.engine import AsyncEngine, LLMEngine, SamplingParams
from moe_runtime.v1 import generation_pb2 as pb
from moe_runtime.v1 import generation_pb2_grpc as pb_grpc


@dataclass
class Run:
    """What one load level measured."""

    mode: str
    clients: int
    wall_s: float = 0.0
    tokens: int = 0
    requests: int = 0
    cancelled: int = 0
    errors: int = 0
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)

    def row(self) -> dict:
        return {"mode": self.mode, "clients": self.clients, "requests": self.requests, "cancelled": self.cancelled,
                "errors": self.errors, "tokens": self.tokens, "wall_s": round(self.wall_s, 3),
                "tok_per_s": round(self.tokens / self.wall_s, 1) if self.wall_s else 0.0,
                "ttft_p50_ms": _ms(self.ttft, 0.5), "ttft_p99_ms": _ms(self.ttft, 0.99),
                "tpot_p50_ms": _ms(self.tpot, 0.5), "tpot_p99_ms": _ms(self.tpot, 0.99)}


def _ms(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return round(1000 * s[min(len(s) - 1, int(q * len(s)))], 2)


def _median_row(runs: list[Run]) -> dict:
    """The run with the median throughput (the machine is shared: single runs are noisy)."""
    rows = sorted((r.row() for r in runs), key=lambda row: row["tok_per_s"])
    row = rows[len(rows) // 2]
    row["tok_per_s_all"] = [r["tok_per_s"] for r in rows]
    return row


def _record(run: Run, t0: float, stamps: list[float], cancelled: bool) -> None:
    run.requests += 1
    run.cancelled += cancelled
    run.tokens += len(stamps)
    if stamps:
        run.ttft.append(stamps[0] - t0)
    if len(stamps) > 1 and not cancelled:
        run.tpot.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))


def _plan(client: int, rounds: int, cancel_every: int) -> list[tuple[str, bool]]:
    """(prompt, cancel?) for each request of one client; deterministic."""
    return [(f"client {client} round {r}: the experts are routed", (client * rounds + r) % cancel_every == 0)
            for r in range(rounds)]


async def grpc_load(address: str, clients: int, rounds: int, max_tokens: int, cancel_every: int) -> Run:
    run = Run("grpc", clients)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)

        async def client(i: int) -> None:
            for prompt, cancel in _plan(i, rounds, cancel_every):
                req = pb.GenerateRequest(prompt=prompt, sampling_params=pb.SamplingParams(
                    max_tokens=max_tokens, ignore_eos=True, temperature=0))
                t0, stamps = time.perf_counter(), []
                call = stub.GenerateStream(req, timeout=600)
                try:
                    async for chunk in call:
                        stamps.extend([time.perf_counter()] * len(chunk.token_ids))
                        if cancel and len(stamps) >= max_tokens // 2:
                            call.cancel()
                            break
                except grpc.aio.AioRpcError:
                    run.errors += 1
                _record(run, t0, stamps, cancel)

        t = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        run.wall_s = time.perf_counter() - t
    return run


async def engine_load(engine: AsyncEngine, clients: int, rounds: int, max_tokens: int, cancel_every: int) -> Run:
    run = Run("in-process", clients)
    tokenizer = engine.tokenizer
    counter = iter(range(10**9))

    async def client(i: int) -> None:
        for prompt, cancel in _plan(i, rounds, cancel_every):
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
            t0, stamps = time.perf_counter(), []
            stream = engine.generate(f"bench-{next(counter)}", tokenizer.encode(prompt), params)
            try:
                async for out in stream:
                    stamps.extend([time.perf_counter()] * len(out.new_token_ids))
                    if cancel and len(stamps) >= max_tokens // 2:
                        break
            finally:
                await stream.aclose()
            _record(run, t0, stamps, cancel)

    t = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    run.wall_s = time.perf_counter() - t
    return run


def start_server(model_dir: Path, overrides: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "moe_runtime.cli", "serve", "--model", str(model_dir), "--port", "0",
           "--metrics-port", "0"]
    for item in overrides:
        cmd += ["--set", item]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    found: list[str] = []
    ready = threading.Event()

    def read() -> None:  # keeps draining stderr (one log line per request) after the address is found
        for line in proc.stderr:
            m = re.search(r"serving on (\S+):(\d+)", line)
            if m and not found:
                found.append(f"{m.group(1)}:{m.group(2)}")
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(300) or not found:
        proc.kill()
        raise SystemExit("server did not start")
    return proc, found[0]


async def in_process(model_dir: Path, levels: list[int], load: tuple[int, int, int, int],
                     overrides: list[str]) -> dict[int, dict]:
    engine = AsyncEngine(LLMEngine(load_config(overrides=[f"model.path={model_dir}", *overrides])))
    await engine.start()
    try:
        await engine_load(engine, 2, 1, 4, 10**9)  # warm-up
        return {n: _median_row([await engine_load(engine, n, *load[:3]) for _ in range(load[3])]) for n in levels}
    finally:
        await engine.shutdown()


def run_in_process_worker(model_dir: Path, args: argparse.Namespace) -> dict[int, dict]:
    """The in-process baseline in a fresh interpreter too, so both sides start from the same process state."""
    cmd = [sys.executable, __file__, "--in-process-worker", "--model", str(model_dir), "--clients", args.clients,
           "--rounds", str(args.rounds), "--max-tokens", str(args.max_tokens), "--cancel-every",
           str(args.cancel_every), "--repeat", str(args.repeat)]
    for item in args.set:
        cmd += ["--set", item]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return {int(k): v for k, v in json.loads(out).items()}


def print_table(rows: list[dict]) -> None:
    cols = ("clients", "mode", "requests", "cancelled", "errors", "tok_per_s", "ttft_p50_ms", "ttft_p99_ms",
            "tpot_p50_ms", "tpot_p99_ms", "vs_in_process")
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")) for c in cols))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="checkpoint dir (default: a fresh tiny preset)")
    ap.add_argument("--clients", default="1,8,64")
    ap.add_argument("--rounds", type=int, default=3, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--cancel-every", type=int, default=8, help="cancel every k-th request at half its tokens")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="config overrides for both runs (after cache.num_blocks=2048, engine.max_num_seqs=64)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per level; the median-throughput run is shown")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--in-process-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.set = ["cache.num_blocks=2048", "engine.max_num_seqs=64", *args.set]
    levels = [int(n) for n in args.clients.split(",")]
    if args.in_process_worker:
        load = (args.rounds, args.max_tokens, args.cancel_every, args.repeat)
        print(json.dumps(asyncio.run(in_process(args.model, levels, load, args.set))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from moe_runtime.presets.init_model import init_model

            model_dir = init_model("tiny", Path(tmp) / "tiny", seed=0)
        load = (args.rounds, args.max_tokens, args.cancel_every)
        proc, address = start_server(model_dir, args.set)
        try:
            asyncio.run(grpc_load(address, 2, 1, 4, 10**9))  # warm-up
            served = {n: _median_row([asyncio.run(grpc_load(address, n, *load[:3])) for _ in range(args.repeat)])
                      for n in levels}
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)

        local = run_in_process_worker(model_dir, args)
    rows = []
    for n in levels:
        served[n]["vs_in_process"] = round(served[n]["tok_per_s"] / local[n]["tok_per_s"], 2) if local[n][
            "tok_per_s"] else ""
        rows += [local[n], served[n]]
    print(f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.rounds} requests x "
          f"{args.max_tokens} tokens per client, every {args.cancel_every}th cancelled at half; median of "
          f"{args.repeat} runs")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
