"""SIGTERM with the HTTP API on: `moe-runtime serve` as a real process (uvicorn must not take the signal
from it). /health answers 503 and new requests 503 at once; an in-flight stream that ends within the grace
finishes; one that does not gets an error event ("server shutting down") and [DONE]; the process exits 0."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx2
import openai
import pytest


@contextmanager
def serve_process(model_dir, grace_s: float) -> Iterator[tuple[subprocess.Popen, str, list[str]]]:
    cmd = [sys.executable, "-m", "moe_runtime.cli", "serve", "--model", str(model_dir), "--port", "0",
           "--metrics-port", "0", "--set", "server.http_port=0", "--set", f"server.drain_grace_s={grace_s}",
           "--set", "cache.num_blocks=256"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    ready = threading.Event()
    url: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"OpenAI-compatible HTTP API on (http://\S+:\d+)/v1", line)
            if m:
                url.append(m.group(1))
                ready.set()
        ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(60) and url, "server did not start:\n" + "".join(lines)
        yield proc, url[0], lines
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        reader.join(5)


def test_sigterm_drains_http_streams(tiny_model_dir):
    with serve_process(tiny_model_dir, grace_s=5) as (proc, url, lines):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        model = client.models.list().data[0].id

        def stream(n: int):
            return iter(client.completions.create(model=model, prompt="drain", max_tokens=n, stream=True,
                                                  extra_body={"ignore_eos": True}))

        short, long = stream(40), stream(4000)
        first = next(short).choices[0].text
        next(long)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while httpx2.get(url + "/health", timeout=2).status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert httpx2.get(url + "/health", timeout=2).json() == {"status": "draining"}
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model=model, prompt="late", max_tokens=2)
        assert err.value.status_code == 503 and "draining" in err.value.message
        rest = list(short)  # in flight at SIGTERM: runs to completion
        assert rest[-1].choices[0].finish_reason == "length" and first is not None
        with pytest.raises(openai.APIError) as err:
            list(long)
        assert "server shutting down" in err.value.message and "drain_grace_s" in err.value.message
        client.close()
        assert proc.wait(30) == 0, "".join(lines)
        assert time.monotonic() - t0 < 20
    log = "".join(lines)
    assert "draining: 2 request(s) in flight" in log and "drain grace over: ending 1 request(s)" in log
    assert '"protocol": "http"' in log and '"status": "UNAVAILABLE"' in log and "Traceback" not in log
