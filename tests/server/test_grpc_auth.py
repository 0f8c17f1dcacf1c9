"""Bearer-token auth: UNAUTHENTICATED without the right token, health stays open."""

from __future__ import annotations

import shutil
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe_runtime.server.client import ClientError, GenerationClient, make_request
from moe_runtime.v1 import generation_pb2 as pb

TOKEN = "s3cret-token"
CASES = (  # (metadata, words in the error)
    ((), "missing authorization metadata"),
    ((("authorization", "Bearer wrong"),), "token is wrong"),
    ((("authorization", TOKEN),), "token is wrong"),  # no "Bearer " scheme
    ((("authorization", f"Bearer {TOKEN}x"),), "token is wrong"),
)


@pytest.fixture(scope="module")
def server(start_server):
    with start_server(auth_token=TOKEN) as srv:
        yield srv


@pytest.mark.parametrize(("metadata", "words"), CASES)
@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream", "GetModelInfo", "GetExpertStats"])
def test_rejected_without_token(server, stub_for, request_for, rpc, metadata, words):
    stub = stub_for(server)
    requests = {"GetModelInfo": pb.GetModelInfoRequest(), "GetExpertStats": pb.GetExpertStatsRequest()}
    request = requests.get(rpc) or request_for(max_tokens=2)
    with pytest.raises(grpc.RpcError) as err:
        result = getattr(stub, rpc)(request, metadata=metadata, timeout=10)
        if rpc == "GenerateStream":
            list(result)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert words in err.value.details()


def test_right_token_and_open_health(server):
    with GenerationClient(server.address, auth_token=TOKEN, timeout_s=10) as client:
        assert len(client.generate(make_request("hi", sampling={"max_tokens": 2, "ignore_eos": True})).token_ids) == 2
    with GenerationClient(server.address, timeout_s=10) as client:
        with pytest.raises(ClientError, match="UNAUTHENTICATED"):
            client.model_info()
    with grpc.insecure_channel(server.address) as channel:
        resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")], check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


def test_tls_with_token(start_server, tls_files):
    cert, key = tls_files
    with start_server(f"server.tls_cert={cert}", f"server.tls_key={key}", auth_token=TOKEN) as srv:
        with GenerationClient(srv.address, auth_token=TOKEN, tls_ca=str(cert), timeout_s=10) as client:
            assert len(client.generate(make_request("hi", sampling={"max_tokens": 2, "ignore_eos": True})).token_ids) == 2
        with GenerationClient(srv.address, auth_token=TOKEN, timeout_s=5) as plaintext:
            with pytest.raises(ClientError, match="UNAVAILABLE"):
                plaintext.model_info()
