"""SIGTERM: the served process stops taking requests, lets in-flight streams finish within the grace
period (the rest then end with UNAVAILABLE "server shutting down"), then exits 0; a second SIGTERM exits at
once. Runs `moe-runtime serve` as a real subprocess."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe_runtime.v1 import generation_pb2 as pb
from moe_runtime.v1 import generation_pb2_grpc as pb_grpc


@contextmanager
def serve_process(model_dir, grace_s: float) -> Iterator[tuple[subprocess.Popen, str, list[str]]]:
    cmd = [sys.executable, "-m", "moe_runtime.cli", "serve", "--model", str(model_dir), "--port", "0",
           "--metrics-port", "0", "--set", f"server.drain_grace_s={grace_s}", "--set", "cache.num_blocks=256"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    ready = threading.Event()
    address: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"serving on (\S+):(\d+)", line)
            if m:
                address.append(f"{m.group(1)}:{m.group(2)}")
                ready.set()
        ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(60) and address, "server did not start:\n" + "".join(lines)
        yield proc, address[0], lines
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        reader.join(5)


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status


def _long_request(n: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt="drain", sampling_params=pb.SamplingParams(max_tokens=n, ignore_eos=True))


def test_sigterm_drains_then_ends_the_rest_with_unavailable(tiny_model_dir):
    """Two streams in flight at SIGTERM: the short one finishes; the long one ends with UNAVAILABLE after the
    grace."""
    with serve_process(tiny_model_dir, grace_s=5) as (proc, address, lines):
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            short = stub.GenerateStream(_long_request(40), timeout=60)
            long = stub.GenerateStream(_long_request(4000), timeout=60)
            got = len(next(short).token_ids)
            next(long)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5
            while _health(address) != health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(_long_request(2), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details()
            chunks = list(short)  # in flight at SIGTERM: runs to completion
            got += sum(len(c.token_ids) for c in chunks)
            assert got == 40 and chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
            with pytest.raises(grpc.RpcError) as err:
                list(long)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "server shutting down" in err.value.details() and "drain_grace_s" in err.value.details()
        assert proc.wait(30) == 0, "".join(lines)
        assert time.monotonic() - t0 < 20
    log = "".join(lines)
    assert "draining: 2 request(s) in flight" in log and "drain grace over: ending 1 request(s)" in log
    assert "stopped" in log
    assert '"request_id"' in log and '"finish_reason": "length"' in log  # the structured request log lines
    assert '"status": "UNAVAILABLE"' in log
    assert "(auth off, TLS off)" in log  # the start-up line says how it is exposed


def test_second_sigterm_exits_at_once(tiny_model_dir):
    """The first SIGTERM drains (a 60 s grace, a long stream in flight); the second exits now, 128 + 15."""
    with serve_process(tiny_model_dir, grace_s=60) as (proc, address, lines):
        with grpc.insecure_channel(address) as channel:
            long = pb_grpc.GenerationServiceStub(channel).GenerateStream(_long_request(4000), timeout=60)
            next(long)
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5
            while _health(address) != health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() < deadline:
                time.sleep(0.01)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 128 + signal.SIGTERM
            assert time.monotonic() - t0 < 3
    log = "".join(lines)
    assert "send it again to exit at once" in log and "second SIGTERM: exiting now without draining" in log
    assert "Traceback" not in log
