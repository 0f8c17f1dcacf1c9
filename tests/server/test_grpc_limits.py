"""RESOURCE_EXHAUSTED: full queue, a prompt the KV cache cannot hold, an oversized message."""

from __future__ import annotations

import time

import grpc
import pytest

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def server(start_server):
    # One running sequence, one queued; 8 blocks x 16 = 128 tokens of KV; 4 KiB requests.
    with start_server("engine.max_num_seqs=1", "server.max_queued_requests=1", "cache.num_blocks=8",
                      "server.max_request_bytes=4096") as srv:
        yield srv


def _code_and_details(fn):
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


def test_queue_full(server, stub_for, request_for):
    stub = stub_for(server)
    running = stub.GenerateStream(request_for([1, 5], max_tokens=120, ignore_eos=True), timeout=60)
    next(running)
    queued = stub.GenerateStream(request_for([1, 6], max_tokens=4), timeout=60)
    deadline = time.monotonic() + 10
    while server.engine.num_waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    code, details = _code_and_details(lambda: stub.Generate(request_for(max_tokens=2), timeout=10))
    assert code == EXHAUSTED
    assert "queue full" in details and "server.max_queued_requests=1" in details
    running.cancel()
    assert len([t for c in queued for t in c.token_ids]) == 4  # the queued one still runs
    assert server.wait_idle().kv_blocks_used == 0
    assert len(stub.Generate(request_for(max_tokens=2), timeout=10).token_ids) == 2


@pytest.mark.parametrize(("prompt_len", "max_tokens"), [(200, 1), (100, 100)])
def test_prompt_cannot_fit_kv_cache(server, stub_for, request_for, prompt_len, max_tokens):
    stub = stub_for(server)
    code, details = _code_and_details(
        lambda: stub.Generate(request_for([3] * prompt_len, max_tokens=max_tokens), timeout=10))
    assert code == EXHAUSTED
    assert "cannot fit in the KV cache (128 tokens" in details and "cache.num_blocks" in details
    assert len(stub.Generate(request_for(max_tokens=2), timeout=10).token_ids) == 2


def test_oversized_message(server, stub_for, request_for):
    stub = stub_for(server)
    big = request_for([1000] * 3000, max_tokens=1)  # ~6 KB of varints > 4 KiB
    code, details = _code_and_details(lambda: stub.Generate(big, timeout=10))
    assert code == EXHAUSTED and "larger than max" in details
    assert len(stub.Generate(request_for(max_tokens=2), timeout=10).token_ids) == 2
