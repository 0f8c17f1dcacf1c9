"""TLS: with `server.tls_cert`/`server.tls_key` the HTTP API speaks HTTPS with the same pair as gRPC, and
`bench serve --tls-ca` reaches both; the model id follows `server.served_model_name`."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess

import httpx2
import pytest

from moe_runtime.cli import main


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")], check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


def test_https_and_bench_over_tls(start_server, tls_files, capsys):
    cert, key = tls_files
    with start_server(f"server.tls_cert={cert}", f"server.tls_key={key}", "server.http_port=0",
                      "server.served_model_name=moe-test") as srv:
        url = f"https://127.0.0.1:{srv.app.http_port}"
        verify = ssl.create_default_context(cafile=str(cert))
        models = httpx2.get(url + "/v1/models", verify=verify, timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["moe-test"]
        done = httpx2.post(url + "/v1/completions", verify=verify, timeout=30,
                           json={"model": "moe-test", "prompt": "hi", "max_tokens": 3, "ignore_eos": True})
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 3
        with pytest.raises(httpx2.RemoteProtocolError):  # plain HTTP to the TLS port
            httpx2.get(f"http://127.0.0.1:{srv.app.http_port}/health", timeout=5)
        for protocol, port in (("http", srv.app.http_port), ("grpc", srv.app.port)):
            rc = main(["bench", "serve", "--server", f"127.0.0.1:{port}", "--protocol", protocol, "--tls-ca",
                       str(cert), "--concurrency", "2", "--num-requests", "2", "--prompt-len", "fixed:4",
                       "--output-len", "fixed:3", "--json"])
            report = json.loads(capsys.readouterr().out)
            assert rc == 0 and report["requests"]["completed"] == 2 and report["tokens"]["generated"] == 6
