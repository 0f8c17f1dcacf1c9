"""A client that goes away aborts its request and frees its KV blocks, streamed or not; a full queue answers
429 and the queued request still runs."""

from __future__ import annotations

import threading
import time

import httpx2
import openai
import pytest


@pytest.fixture(scope="module")
def server(start_server):
    # One running sequence, one queued.
    with start_server("server.http_port=0", "engine.max_num_seqs=1", "server.max_queued_requests=1") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server, openai_for):
    return openai_for(server)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def _long(client, model, **kw):
    return client.completions.create(model=model, prompt="a long answer", max_tokens=3000, temperature=0,
                                     extra_body={"ignore_eos": True}, **kw)


def test_disconnect_mid_stream_frees_kv_blocks(server, client, model):
    cancelled = server.app.telemetry.finished_counts().get("cancelled", 0)
    stream = _long(client, model, stream=True)
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    assert server.engine.make_stats().kv_blocks_used > 0 and len(server.app.http.in_flight) == 1
    stream.close()  # the connection goes: the server aborts the request
    stats = server.wait_idle()
    assert (stats.kv_blocks_used, stats.num_running, stats.num_waiting) == (0, 0, 0)
    assert not server.app.http.in_flight
    assert server.app.telemetry.finished_counts().get("cancelled", 0) == cancelled + 1


def test_disconnect_during_a_whole_response_frees_kv_blocks(server, model):
    cancelled = server.app.telemetry.finished_counts().get("cancelled", 0)
    with pytest.raises(httpx2.ReadTimeout):  # the client gives up and closes the connection
        httpx2.post(server.http_url + "/v1/completions", timeout=httpx2.Timeout(30, read=0.5),
                    json={"model": model, "prompt": "a long answer", "max_tokens": 3000, "ignore_eos": True})
    stats = server.wait_idle()
    assert (stats.kv_blocks_used, stats.num_running) == (0, 0) and not server.app.http.in_flight
    assert server.app.telemetry.finished_counts().get("cancelled", 0) == cancelled + 1


def test_queue_full_is_429_and_the_queued_request_still_runs(server, client, model):
    running = client.completions.create(model=model, prompt="runs", max_tokens=200, temperature=0, stream=True,
                                        extra_body={"ignore_eos": True})
    next(iter(running))
    queued: list = []
    thread = threading.Thread(target=lambda: queued.append(client.completions.create(
        model=model, prompt="waits", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})))
    thread.start()
    deadline = time.monotonic() + 10
    while server.engine.num_waiting < 1 and time.monotonic() < deadline:  # no event says "queued"
        time.sleep(0.001)
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(model=model, prompt="refused", max_tokens=2)
    assert err.value.status_code == 429 and err.value.code == "queue_full"
    assert "queue full" in err.value.message and "server.max_queued_requests=1" in err.value.message
    assert err.value.response.headers["retry-after"] == "1"
    running.close()
    thread.join(30)
    assert queued and queued[0].usage.completion_tokens == 4  # the queued one ran
    assert server.wait_idle().kv_blocks_used == 0
    assert client.completions.create(model=model, prompt="after", max_tokens=2).usage.completion_tokens <= 2
