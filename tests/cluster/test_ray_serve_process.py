"""`moe-runtime serve` with the Ray executor as a real process: SIGTERM drains the stream in flight, shuts Ray
down and exits 0 (before: Ray's crash reporter dumped "*** SIGTERM received ***" and the process aborted
with 134); a cluster that never comes up is one line and exit 1 after `ray.connect_timeout_s` (before: a
57-line ConnectionError traceback after 2 s); SIGTERM while it still waits for the cluster ends the wait
and exits 0 (a pod deleted before its Ray head came up)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from moe_runtime.v1 import generation_pb2 as pb
from moe_runtime.v1 import generation_pb2_grpc as pb_grpc

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny-ray-2-workers.yaml"
MOE_RUNTIME = Path(sys.executable).parent / "moe-runtime"


@contextmanager
def serve(model_dir: Path, *sets: str) -> Iterator[tuple[subprocess.Popen, list[str], threading.Event]]:
    """The process, its stderr lines as they come, and an event set once it serves (or exits)."""
    cmd = [str(MOE_RUNTIME), "serve", "--config", str(CONFIG), "--model", str(model_dir), "--port", "0",
           "--metrics-port", "0", "--set", "cache.num_blocks=64", *(a for s in sets for a in ("--set", s))]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "serving on" in line:
                ready.set()
        ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield proc, lines, ready
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        reader.join(10)


def _port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        return True
    except OSError:
        return False


def test_sigterm_drains_stops_ray_and_exits_0(tiny_model_dir):
    with serve(tiny_model_dir, "server.drain_grace_s=30") as (proc, lines, ready):
        assert ready.wait(180) and proc.poll() is None, "".join(lines)
        started = "".join(lines)
        serving = re.search(r"serving on (\S+:\d+)", started)
        gcs = re.search(r"Ray: started a local cluster at (\S+:\d+)", started)
        assert serving and gcs, started
        address, gcs = serving.group(1), gcs.group(1)
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            stream = stub.GenerateStream(pb.GenerateRequest(prompt_token_ids=[1, 300, 301], sampling_params=(
                pb.SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))), timeout=120)
            got = len(next(stream).token_ids)
            proc.send_signal(signal.SIGTERM)
            got += sum(len(chunk.token_ids) for chunk in stream)  # in flight at SIGTERM: runs to the end
        assert got == 24
        assert proc.wait(90) == 0, "".join(lines)
    log = "".join(lines)
    assert "SIGTERM received" not in log and "Traceback" not in log, log
    assert "draining: 1 request(s) in flight" in log and "stopped" in log
    assert not _port_open(gcs), "the local Ray cluster outlived the server"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_cluster_is_one_line_after_the_timeout(tiny_model_dir):
    port = _free_port()
    with serve(tiny_model_dir, f"ray.address=127.0.0.1:{port}", "ray.connect_timeout_s=3") as (proc, lines, _):
        assert proc.wait(60) == 1
    log = "".join(lines)
    assert "Traceback" not in log, log
    assert lines[-1].startswith(f"moe-runtime serve: error: ray.address='127.0.0.1:{port}': no Ray after")
    assert "in 3 s (ray.connect_timeout_s)" in lines[-1] and "ray start --head" in lines[-1]
    assert sum("retrying in" in line for line in lines) >= 2  # backoff, one line per attempt


def test_sigterm_while_waiting_for_ray_exits_0(tiny_model_dir):
    """With the whole hour of ray.connect_timeout_s left, SIGTERM still ends the wait: before, the loading
    thread kept retrying until the budget ran out (the pod was killed after its grace period)."""
    port = _free_port()
    with serve(tiny_model_dir, f"ray.address=127.0.0.1:{port}", "ray.connect_timeout_s=3600") as (proc, lines, _):
        while not any("retrying in" in line for line in lines):
            assert proc.poll() is None, "".join(lines)
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, "".join(lines)
    log = "".join(lines)
    assert "Traceback" not in log and "error" not in lines[-1], log
    assert "SIGTERM: draining" in log and "stopped" in lines[-1]
