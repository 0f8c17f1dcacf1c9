"""gRPC on a checkpoint without tokenizer.json: prompt_token_ids work (empty text), text prompts and stop
strings get FAILED_PRECONDITION naming the missing file, and no KV block is held afterwards."""

from __future__ import annotations

import grpc
import pytest

from moe_runtime.v1 import generation_pb2 as pb

PROMPT_IDS = [1, 5, 6, 7]


def test_grpc_token_ids_work_and_text_fails_precondition(no_tokenizer_dir, start_server, stub_for, request_for):
    with start_server(model_dir=no_tokenizer_dir) as srv:
        stub = stub_for(srv)
        resp = stub.Generate(request_for(PROMPT_IDS, max_tokens=5, temperature=0), timeout=30)
        assert len(resp.token_ids) == 5 and resp.text == ""
        assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).tokenizer == ""
        for request in (request_for("Hello", max_tokens=4), request_for(PROMPT_IDS, max_tokens=4, stop=["x"])):
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(request, timeout=30)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "tokenizer.json" in e.value.details()
        assert srv.wait_idle().kv_blocks_used == 0
