"""Clients that send what no stub would: the server answers each with the right status, keeps its event loop
free for everyone else, and logs one line per request at most (never a traceback).

1. A prompt just under gRPC's 4 MiB limit is refused before it is tokenized: meanwhile a concurrent stream's
   largest gap between chunks and a health check's latency stay under 200 ms (they were ~4 s and ~8 s).
2. Bytes that do not parse as the method's request (invalid UTF-8 in `prompt`, garbage, a truncated message)
   answer INVALID_ARGUMENT, not UNKNOWN with a traceback; with auth on, UNAUTHENTICATED comes first.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe_runtime.v1 import generation_pb2 as pb
from moe_runtime.v1 import generation_pb2_grpc as pb_grpc

MAX_STALL_S = 0.2
BIG_PROMPT_BYTES = 3_900_000  # just under gRPC's default 4 MiB receive limit
TOKEN = "hostile-test-token"
GENERATE = "/moe_runtime.v1.GenerationService/Generate"

UNDECODABLE = (  # (case, raw request bytes)
    ("invalid UTF-8 in prompt", b"\x12\x03\xff\xfe\xfd"),  # field 2 (prompt), length 3
    ("invalid UTF-8 in field 1", b"\x0a\x03\xff\xfe\xfd"),  # request_id, or the health check's service
    ("garbage", b"\xff\xff\xff\xff\xff"),
    ("truncated", b"\x12\x10abc"),  # says 16 bytes follow, sends 3
)
METHODS = (  # (method path, response streaming); health is open to all, so it must hold up too
    (GENERATE, False),
    ("/moe_runtime.v1.GenerationService/GenerateStream", True),
    ("/moe_runtime.v1.GenerationService/GetModelInfo", False),
    ("/moe_runtime.v1.GenerationService/Abort", False),
    ("/grpc.health.v1.Health/Check", False),
)


@pytest.fixture(scope="module")
def server(start_server):
    with start_server("cache.num_blocks=512") as srv:
        yield srv


@pytest.fixture(scope="module")
def auth_server(start_server):
    with start_server(auth_token=TOKEN) as srv:
        yield srv


def _raw_call(channel: grpc.Channel, method: str, streaming: bool):
    make = channel.unary_stream if streaming else channel.unary_unary
    call = make(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)

    def send(raw: bytes, **kwargs):
        result = call(raw, timeout=10, **kwargs)
        return list(result) if streaming else result

    return send


def _refusal(send, raw: bytes, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        send(raw, **kwargs)
    return err.value


# -- 1. no head-of-line blocking ----------------------------------------------------------------------------
def test_big_prompts_do_not_stall_streams_or_health(server):
    """Three ~3.9 MB prompts at once (serialized up front, so the client's own work is not measured) while
    one stream decodes and health is polled."""
    raw = pb.GenerateRequest(prompt="a" * BIG_PROMPT_BYTES,
                             sampling_params=pb.SamplingParams(max_tokens=1)).SerializeToString()
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        stream = stub.GenerateStream(pb.GenerateRequest(prompt="x", sampling_params=pb.SamplingParams(
            max_tokens=3000, ignore_eos=True)), timeout=120)
        next(stream)
        chunk_times: list[float] = []

        def read() -> None:
            with contextlib.suppress(grpc.RpcError):  # cancelled at the end
                chunk_times.extend(time.monotonic() for _ in stream)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        time.sleep(0.2)  # the stream is in its stride

        refusals: list[grpc.RpcError] = []
        send = _raw_call(channel, GENERATE, streaming=False)
        senders = [threading.Thread(target=lambda: refusals.append(_refusal(send, raw))) for _ in range(3)]
        started = time.monotonic()
        for t in senders:
            t.start()
        health_latencies = []
        while any(t.is_alive() for t in senders) or len(health_latencies) < 5:
            t0 = time.monotonic()
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
            health_latencies.append(time.monotonic() - t0)
            time.sleep(0.01)
        ended = time.monotonic()
        for t in senders:
            t.join()
        time.sleep(0.2)
        stream.cancel()
        reader.join(10)

    window = [b - a for a, b in zip(chunk_times, chunk_times[1:], strict=False) if b > started and a < ended]
    assert window, "the stream sent no chunk while the prompts were refused"
    assert max(window) < MAX_STALL_S, f"stream stalled {max(window):.3f} s"
    assert max(health_latencies) < MAX_STALL_S, f"health check took {max(health_latencies):.3f} s"
    assert len(refusals) == 3
    for e in refusals:  # refused by size, before tokenizing
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"prompt=<{BIG_PROMPT_BYTES} bytes of text>: longer than the context" in e.details()


def test_millions_of_token_ids_are_refused_and_the_server_serves_on(server, stub_for):
    ids = [5] * 4_000_000  # ~4 MB of one-byte varints
    stub = stub_for(server, **{"grpc.max_send_message_length": 8 << 20})
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(prompt_token_ids=ids, sampling_params=pb.SamplingParams(max_tokens=1)),
                      timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt='<4000000 tokens>': longer than the context" in err.value.details()
    ok = stub.Generate(pb.GenerateRequest(prompt="ok", sampling_params=pb.SamplingParams(max_tokens=2,
                                                                                         ignore_eos=True)), timeout=10)
    assert len(ok.token_ids) == 2


def test_text_at_the_bound_is_tokenized_and_then_refused_by_its_token_count(server, stub_for):
    """Under the byte bound the text is tokenized (in a thread) and the engine's token count decides."""
    limit = (server.engine.model_config.max_position_embeddings - 1) * server.engine.tokenizer.max_token_bytes
    text = ("ab " * limit)[:limit]
    with pytest.raises(grpc.RpcError) as err:
        stub_for(server).Generate(pb.GenerateRequest(prompt=text), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "longer than the context; allowed: at most 4095 tokens" in err.value.details()


# -- 2. undecodable requests --------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "streaming"), METHODS, ids=[m[0].rsplit("/", 1)[-1] for m in METHODS])
@pytest.mark.parametrize(("case", "raw"), UNDECODABLE, ids=[c[0] for c in UNDECODABLE])
def test_undecodable_request_is_invalid_argument_with_one_log_line(server, caplog, method, streaming, case, raw):
    no_such_field = (method.endswith(("GetModelInfo", "Check", "Abort")) and case == "invalid UTF-8 in prompt"
                     or method.endswith("GetModelInfo") and case == "invalid UTF-8 in field 1")
    if no_such_field:
        pytest.skip("that request has no such string field: protobuf keeps it as an unknown field, rightly")
    with grpc.insecure_channel(server.address) as channel, caplog.at_level(logging.INFO):
        caplog.clear()
        err = _refusal(_raw_call(channel, method, streaming), raw)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "not a valid protobuf message" in err.details() and method in err.details()
    time.sleep(0.05)  # the server logs after it answers
    about_this = [r.getMessage() for r in caplog.records if f'"method": "{method}"' in r.getMessage()]
    assert len(about_this) == 1, about_this  # the request log line
    assert not any(r.exc_info or r.levelno >= logging.WARNING for r in caplog.records)


def test_undecodable_reflection_stream_is_invalid_argument(server):
    with grpc.insecure_channel(server.address) as channel:
        call = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                     request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as err:
            list(call(iter([b"\xff\xff\xff"]), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_server_still_serves_after_garbage(server, stub_for):
    resp = stub_for(server).Generate(pb.GenerateRequest(prompt="hi", sampling_params=pb.SamplingParams(
        max_tokens=2, ignore_eos=True)), timeout=10)
    assert len(resp.token_ids) == 2


@pytest.mark.parametrize(("metadata", "code"), (
    ((), grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", "Bearer wrong"),), grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", f"Bearer {TOKEN}"),), grpc.StatusCode.INVALID_ARGUMENT),
), ids=["no token", "wrong token", "right token"])
@pytest.mark.parametrize(("case", "raw"), UNDECODABLE, ids=[c[0] for c in UNDECODABLE])
def test_auth_is_asked_before_the_request_is_parsed(auth_server, caplog, metadata, code, case, raw):
    with grpc.insecure_channel(auth_server.address) as channel, caplog.at_level(logging.INFO):
        caplog.clear()
        err = _refusal(_raw_call(channel, GENERATE, streaming=False), raw, metadata=metadata)
    assert err.code() == code, err.details()
    assert not any(r.exc_info or r.levelno >= logging.WARNING for r in caplog.records)
