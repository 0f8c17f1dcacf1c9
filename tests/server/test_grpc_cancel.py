"""Client cancel and deadlines abort the request in the engine and free its KV blocks; no leak under load."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from moe_runtime.v1 import generation_pb2 as pb
from moe_runtime.v1 import generation_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def server(start_server):
    with start_server("engine.max_num_seqs=32") as srv:
        yield srv


def _long(request_for, **kw):
    return request_for(max_tokens=3000, ignore_eos=True, **kw)


def test_cancel_frees_kv_blocks(server, stub_for, request_for):
    stream = stub_for(server).GenerateStream(_long(request_for, request_id="cancel-me"), timeout=60)
    for _ in range(3):
        next(stream)
    assert server.engine.make_stats().kv_blocks_used > 0
    stream.cancel()
    stats = server.wait_idle()
    assert (stats.kv_blocks_used, stats.num_running, stats.num_waiting) == (0, 0, 0)
    assert server.app.telemetry.finished_counts().get("cancelled", 0) >= 1


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_deadline_frees_kv_blocks(server, stub_for, request_for, rpc):
    with pytest.raises(grpc.RpcError) as err:
        result = getattr(stub_for(server), rpc)(_long(request_for), timeout=0.3)
        if rpc == "GenerateStream":
            list(result)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stats = server.wait_idle()
    assert (stats.kv_blocks_used, stats.num_running) == (0, 0)


async def _load(address: str, n: int, seed: int) -> dict[str, int]:
    """n concurrent streams: a third cancel after a few chunks, some hit a short deadline, the rest finish."""
    rng = random.Random(seed)
    outcomes: dict[str, int] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)

        async def one(i: int) -> None:
            kind = rng.choice(["finish", "finish", "cancel", "deadline"])
            req = pb.GenerateRequest(prompt=f"stream {i} " * rng.randint(1, 20),
                                     sampling_params=pb.SamplingParams(max_tokens=rng.randint(4, 48), ignore_eos=True,
                                                                       seed=i))
            call = stub.GenerateStream(req, timeout=0.2 if kind == "deadline" else 60)
            stop_after = rng.randint(1, 3)
            got = 0
            try:
                async for chunk in call:
                    got += len(chunk.token_ids)
                    if kind == "cancel" and got >= stop_after:
                        call.cancel()
                        break
                outcome = "cancelled" if kind == "cancel" else "finished"
            except grpc.aio.AioRpcError as e:
                outcome = e.code().name.lower()
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

        await asyncio.gather(*(one(i) for i in range(n)))
    return outcomes


def test_64_streams_with_random_cancels_leak_nothing(server, stub_for, request_for):
    outcomes = asyncio.run(_load(server.address, 64, seed=0))
    assert sum(outcomes.values()) == 64
    assert set(outcomes) <= {"finished", "cancelled", "deadline_exceeded"}, outcomes
    assert outcomes.get("finished", 0) > 0 and outcomes.get("cancelled", 0) > 0
    stats = server.wait_idle()
    assert (stats.kv_blocks_used, stats.num_running, stats.num_waiting) == (0, 0, 0)
    assert not server.app.servicer.in_flight
    assert stats.kv_blocks_free == stats.kv_blocks_total
    assert len(stub_for(server).Generate(request_for(max_tokens=3), timeout=10).token_ids) == 3
