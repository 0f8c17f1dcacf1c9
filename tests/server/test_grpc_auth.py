"""Bearer-token auth: UNAUTHENTICATED without the right token, health stays open; TLS errors that say what
is wrong; a warning when the server is reachable from other machines without auth or TLS."""

from __future__ import annotations

import shutil
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe_runtime.config import ServerConfig
from moe_runtime.errors import ConfigError
from moe_runtime.server.app import exposure_warning
from moe_runtime.server.client import ClientError, GenerationClient, make_request
from moe_runtime.server.tls import server_credentials
from moe_runtime.v1 import generation_pb2 as pb

TOKEN = "s3cret-token"
CASES = (  # (metadata, words in the error)
    ((), "missing authorization metadata"),
    ((("authorization", "Bearer wrong"),), "token is wrong"),
    ((("authorization", TOKEN),), "token is wrong"),  # no "Bearer " scheme
    ((("authorization", f"Bearer {TOKEN}x"),), "token is wrong"),
    ((("authorization", f"Basic {TOKEN}"),), "token is wrong"),
)
SCHEMES = ("Bearer", "bearer", "BEARER", "bEaReR")  # RFC 7235: the scheme is case-insensitive


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


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_scheme_is_case_insensitive(server, stub_for, scheme):
    info = stub_for(server).GetModelInfo(pb.GetModelInfoRequest(), metadata=(("authorization", f"{scheme} {TOKEN}"),),
                                         timeout=10)
    assert info.num_experts == 8


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
            with pytest.raises(ClientError, match="UNAVAILABLE: server requires TLS: pass --tls-ca"):
                plaintext.model_info()


def test_tls_client_against_a_plaintext_server_says_so(server, tls_files):
    cert, _ = tls_files
    with GenerationClient(server.address, auth_token=TOKEN, tls_ca=str(cert), timeout_s=5) as client:
        with pytest.raises(ClientError, match="server does not use TLS: drop --tls-ca"):
            client.model_info()


@pytest.fixture(scope="module")
def other_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls-other")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=other", "-keyout", str(d / "key.pem"), "-out",
                    str(d / "cert.pem")], check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


def test_pem_problems_are_named(tls_files, other_pair, tmp_path):
    """Each used to be "cannot bind ... pick another port"."""
    cert, key = tls_files
    garbled = tmp_path / "garbled.pem"
    garbled.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    cases = (  # (tls_cert, tls_key, words)
        (key, cert, "swapped"),
        (cert, other_pair[1], "the key does not belong to the certificate"),
        (cert, tmp_path / "missing.pem", "cannot read (No such file or directory)"),
        (cert, cert, "no PEM private key"),
        (garbled, key, "not a usable certificate and key"),
    )
    for tls_cert, tls_key, words in cases:
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
            server_credentials(ServerConfig(tls_cert=str(tls_cert), tls_key=str(tls_key)))
    assert server_credentials(ServerConfig(tls_cert=str(cert), tls_key=str(key))) is not None
    assert server_credentials(ServerConfig()) is None


EXPOSURE = (  # (host, auth, tls, words in the warning or None)
    ("127.0.0.1", False, False, None),
    ("localhost", False, False, None),
    ("::1", False, False, None),
    ("0.0.0.0", True, True, None),
    ("0.0.0.0", False, False, "without auth"),
    ("0.0.0.0", True, False, "without TLS"),
    ("10.1.2.3", False, True, "without auth"),
    ("server.example", True, False, "without TLS"),
)


@pytest.mark.parametrize(("host", "auth", "tls", "words"), EXPOSURE)
def test_a_reachable_server_without_auth_or_tls_warns(host, auth, tls, words):
    pem = {"tls_cert": "c.pem", "tls_key": "k.pem"} if tls else {}
    warning = exposure_warning(ServerConfig(host=host, **pem), auth)
    if words is None:
        assert warning is None
    else:
        assert f"server.host={host!r} is reachable from other machines" in warning and words in warning
