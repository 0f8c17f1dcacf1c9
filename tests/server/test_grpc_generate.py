"""Generation over a real server equals the offline engine; model info, abort, health and reflection."""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as rpb

from moe_runtime.config import load_config
from moe_runtime.engine import LLMEngine, SamplingParams
from moe_runtime.server.client import accumulate
from moe_runtime.server.convert import FINISH_REASONS
from moe_runtime.v1 import generation_pb2 as pb

CASES = (  # (prompt, sampling): greedy, seeded sampling with filters, token-id prompt with logprobs
    ("Hello world", {"max_tokens": 8, "temperature": 0.0, "ignore_eos": False}),
    ("The experts route", {"max_tokens": 12, "temperature": 0.8, "top_k": 50, "top_p": 0.9, "seed": 1234}),
    ([1, 17, 300, 42, 9], {"max_tokens": 6, "temperature": 1.0, "seed": 7, "logprobs": True, "top_logprobs": 3}),
)


@pytest.fixture(scope="module")
def server(start_server):
    with start_server() as srv:
        yield srv


@pytest.fixture(scope="module")
def offline(tiny_model_dir):
    engine = LLMEngine(load_config(overrides=[f"model.path={tiny_model_dir}", "cache.num_blocks=256"]))
    yield engine
    engine.shutdown()


def _offline_params(sampling: dict) -> SamplingParams:
    kw = {"ignore_eos": True, **{k: v for k, v in sampling.items() if k not in ("logprobs", "top_logprobs")}}
    return SamplingParams(**kw, logprobs=sampling.get("top_logprobs") if sampling.get("logprobs") else None)


@pytest.mark.parametrize(("prompt", "sampling"), CASES)
def test_unary_and_stream_equal_offline(server, offline, stub_for, request_for, prompt, sampling):
    (want,) = offline.generate([prompt], _offline_params(sampling))
    stub = stub_for(server)
    unary = stub.Generate(request_for(prompt, **sampling), timeout=30)
    *_, (last, streamed) = accumulate(stub.GenerateStream(request_for(prompt, **sampling), timeout=30))
    for got in (unary, streamed):
        assert list(got.token_ids) == want.token_ids
        assert got.text == want.text
        assert got.finish_reason == FINISH_REASONS[want.finish_reason]
        assert got.usage.prompt_tokens == want.num_prompt_tokens
        assert got.usage.completion_tokens == len(want.token_ids)
        assert got.timings.total_s >= got.timings.time_to_first_token_s > 0
    assert last.finish_reason == FINISH_REASONS[want.finish_reason]  # only the last chunk carries it
    if sampling.get("logprobs"):
        for got in (unary, streamed):
            assert [lp.token_id for lp in got.logprobs] == want.token_ids
            assert [lp.logprob for lp in got.logprobs] == pytest.approx([lp.logprob for lp in want.logprobs])
            assert all(len(lp.top) == sampling["top_logprobs"] for lp in got.logprobs)
    else:
        assert not unary.logprobs


def test_stream_sends_one_chunk_per_token_then_finishes(server, stub_for, request_for):
    chunks = list(stub_for(server).GenerateStream(request_for(max_tokens=5, temperature=0, request_id="chunks")))
    assert all(c.request_id == "chunks" for c in chunks)
    assert sum(len(c.token_ids) for c in chunks) == 5
    assert [c.finish_reason for c in chunks[:-1]] == [pb.FINISH_REASON_UNSPECIFIED] * (len(chunks) - 1)
    assert chunks[-1].usage.completion_tokens == 5


def test_request_id_generated_when_empty(server, stub_for, request_for):
    a = stub_for(server).Generate(request_for(max_tokens=1), timeout=30)
    b = stub_for(server).Generate(request_for(max_tokens=1), timeout=30)
    assert a.request_id and b.request_id and a.request_id != b.request_id


def test_stop_string_and_stop_token(server, offline, stub_for, request_for):
    (free,) = offline.generate(["Hello world"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    stub = stub_for(server)
    by_token = stub.Generate(request_for(max_tokens=8, temperature=0, stop_token_ids=[free.token_ids[2]]))
    assert list(by_token.token_ids) == free.token_ids[:3]
    assert by_token.finish_reason == pb.FINISH_REASON_STOP


def test_abort_rpc_ends_stream_with_abort(server, stub_for, request_for):
    stub = stub_for(server)
    stream = stub.GenerateStream(request_for(max_tokens=2000, ignore_eos=True, request_id="to-abort"), timeout=60)
    first = next(stream)
    assert first.request_id == "to-abort"
    assert stub.Abort(pb.AbortRequest(request_id="to-abort")).aborted
    rest = list(stream)
    assert rest[-1].finish_reason == pb.FINISH_REASON_ABORT
    assert not stub.Abort(pb.AbortRequest(request_id="to-abort")).aborted  # no longer in flight
    assert server.wait_idle().kv_blocks_used == 0


def test_model_info(server, stub_for, tiny_model_dir):
    info = stub_for(server).GetModelInfo(pb.GetModelInfoRequest())
    assert (info.architecture, info.num_layers, info.num_experts, info.experts_per_token) == (
        "MixtralForCausalLM", 2, 8, 2)
    assert info.vocab_size == 2048 and info.max_context == 4096 and info.dtype == "float32"
    assert info.model_path == str(tiny_model_dir)


def test_health_serving(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "moe_runtime.v1.GenerationService"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_services(server, version):
    with grpc.insecure_channel(server.address) as channel:
        call = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                     request_serializer=rpb.ServerReflectionRequest.SerializeToString,
                                     response_deserializer=rpb.ServerReflectionResponse.FromString)
        responses = list(call(iter([
            rpb.ServerReflectionRequest(list_services=""),
            rpb.ServerReflectionRequest(file_containing_symbol="moe_runtime.v1.GenerationService"),
        ]), timeout=5))
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"moe_runtime.v1.GenerationService", "grpc.health.v1.Health",
            f"grpc.reflection.{version}.ServerReflection"} <= names
    assert responses[1].file_descriptor_response.file_descriptor_proto  # the proto is served


def test_concurrent_streams_share_batches(server, stub_for, request_for):
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        resp = stub_for(server).Generate(request_for(f"prompt {i}", max_tokens=6, temperature=0), timeout=60)
        results[i] = list(resp.token_ids)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == list(range(8)) and all(len(v) == 6 for v in results.values())
