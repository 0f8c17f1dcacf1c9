"""Every bad request gets its status code and a message naming the field; the server keeps serving."""

from __future__ import annotations

import grpc
import pytest

from moe_runtime.v1 import generation_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT
BAD_REQUESTS = (  # (case, prompt, sampling, code, words the message must contain)
    ("empty prompt", "", {}, INVALID, ["prompt is empty", "prompt_token_ids is empty"]),
    ("both prompt and ids", None, {}, INVALID, ["prompt and prompt_token_ids are both set"]),
    ("token id past vocab", [1, 2048], {}, INVALID, ["prompt_token_ids[1]=2048", "[0, 2048)"]),
    ("negative token id", [-5], {}, INVALID, ["prompt_token_ids[0]=-5"]),
    ("prompt longer than context", [7] * 4096, {}, INVALID, ["prompt=", "longer than the context", "4095"]),
    ("max_tokens 0", "hi", {"max_tokens": 0}, INVALID, ["sampling_params.max_tokens=0", "> 0"]),
    ("max_tokens negative", "hi", {"max_tokens": -3}, INVALID, ["sampling_params.max_tokens=-3"]),
    ("max_tokens past context", "hi", {"max_tokens": 5000}, INVALID,
     ["sampling_params.max_tokens=5000", "context (4096)"]),
    ("temperature negative", "hi", {"temperature": -0.5}, INVALID, ["sampling_params.temperature=-0.5", ">= 0"]),
    ("temperature NaN", "hi", {"temperature": float("nan")}, INVALID, ["sampling_params.temperature=nan"]),
    ("top_p 0", "hi", {"top_p": 0.0}, INVALID, ["sampling_params.top_p=0.0", "(0, 1]"]),
    ("top_p above 1", "hi", {"top_p": 1.5}, INVALID, ["sampling_params.top_p=1.5"]),
    ("top_k below -1", "hi", {"top_k": -2}, INVALID, ["sampling_params.top_k=-2", "-1 (off) or >= 1"]),
    ("top_k 0", "hi", {"top_k": 0}, INVALID, ["sampling_params.top_k=0"]),
    ("min_p above 1", "hi", {"min_p": 2.0}, INVALID, ["sampling_params.min_p=2.0", "[0, 1]"]),
    ("stop list too long", "hi", {"stop": [f"s{i}" for i in range(17)]}, INVALID,
     ["sampling_params.stop=", "at most 16"]),
    ("empty stop string", "hi", {"stop": ["ok", ""]}, INVALID, ["sampling_params.stop[1]"]),
    ("stop token past vocab", "hi", {"stop_token_ids": [99999]}, INVALID, ["sampling_params.stop_token_ids[0]=99999"]),
    ("top_logprobs without logprobs", "hi", {"top_logprobs": 2}, INVALID,
     ["sampling_params.top_logprobs=2", "logprobs=true"]),
    ("top_logprobs too many", "hi", {"logprobs": True, "top_logprobs": 21}, INVALID,
     ["sampling_params.top_logprobs=21", "[0, 20]"]),
    ("request_id too long", "hi", {"request_id": "x" * 200}, INVALID, ["request_id=", "at most 128"]),
)


@pytest.fixture(scope="module")
def server(start_server):
    with start_server() as srv:
        yield srv


def _request(prompt, sampling: dict) -> pb.GenerateRequest:
    sampling = dict(sampling)
    request_id = sampling.pop("request_id", "")
    if prompt is None:  # both set
        return pb.GenerateRequest(prompt="hi", prompt_token_ids=[1, 2], sampling_params=pb.SamplingParams(**sampling))
    ids = prompt if isinstance(prompt, list) else []
    text = prompt if isinstance(prompt, str) else ""
    return pb.GenerateRequest(request_id=request_id, prompt=text, prompt_token_ids=ids,
                              sampling_params=pb.SamplingParams(**sampling))


def _still_serving(stub) -> None:
    ok = pb.GenerateRequest(prompt="ok", sampling_params=pb.SamplingParams(max_tokens=2, ignore_eos=True))
    resp = stub.Generate(ok, timeout=10)
    assert len(resp.token_ids) == 2


@pytest.mark.parametrize(("case", "prompt", "sampling", "code", "words"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_bad_request(server, stub_for, rpc, case, prompt, sampling, code, words):
    stub = stub_for(server)
    with pytest.raises(grpc.RpcError) as err:
        result = getattr(stub, rpc)(_request(prompt, sampling), timeout=10)
        if rpc == "GenerateStream":
            list(result)
    assert err.value.code() == code, err.value.details()
    for word in words:
        assert word in err.value.details()
    _still_serving(stub)


def test_duplicate_request_id_in_flight(server, stub_for, request_for):
    stub = stub_for(server)
    first = stub.GenerateStream(request_for(max_tokens=3000, ignore_eos=True, request_id="dup"), timeout=60)
    next(first)
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(request_for(max_tokens=2, request_id="dup"), timeout=10)
    assert err.value.code() == INVALID
    assert "request_id='dup'" in err.value.details() and "already in flight" in err.value.details()
    first.cancel()
    assert server.wait_idle().kv_blocks_used == 0
    assert len(stub.Generate(request_for(max_tokens=2, request_id="dup"), timeout=10).token_ids) == 2  # id free again


def test_unknown_fields_are_ignored(server):
    """proto3 skips unknown fields: a newer client's extra field must not break an older server."""
    sampling = pb.SamplingParams(max_tokens=2, ignore_eos=True)
    known = pb.GenerateRequest(prompt="hi", sampling_params=sampling).SerializeToString()
    unknown = bytes([0xC0, 0x3E, 0x01]) + bytes([0xCA, 0x3E, 0x03]) + b"abc"  # field 1000 varint, 1001 bytes
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary("/moe_runtime.v1.GenerationService/Generate",
                                   request_serializer=lambda b: b, response_deserializer=pb.GenerateResponse.FromString)
        resp = call(known + unknown, timeout=10)
    assert len(resp.token_ids) == 2


def test_abort_without_id(server, stub_for):
    with pytest.raises(grpc.RpcError) as err:
        stub_for(server).Abort(pb.AbortRequest(), timeout=5)
    assert err.value.code() == INVALID and "request_id=''" in err.value.details()
