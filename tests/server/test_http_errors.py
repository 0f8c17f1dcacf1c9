"""Refusals of the HTTP API: OpenAI's error shape, the right status, a message naming the field, its value
and what is allowed; the same rules as gRPC (the engine's), the same Bearer token."""

from __future__ import annotations

import httpx2
import openai
import pytest


@pytest.fixture(scope="module")
def server(start_server, tiny_model_dir):
    # 8 blocks x 16 = 128 tokens of KV; 4 KiB request bodies; auth on.
    with start_server("server.http_port=0", "cache.num_blocks=8", "server.max_request_bytes=4096",
                      auth_token="s3cret-token") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server, openai_for):
    return openai_for(server, api_key="s3cret-token")


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def _post(server, path, body, token="s3cret-token", **kw):
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    if not isinstance(body, (dict, list)):  # raw bytes, or an iterator of them (sent chunked)
        return httpx2.post(server.http_url + path, content=body, headers=headers, timeout=30, **kw)
    return httpx2.post(server.http_url + path, json=body, headers=headers, timeout=30, **kw)


def _error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# Each: request fields, param, what the message starts with (field=value), what it says is allowed.
BAD_COMPLETIONS = [
    ({"temperature": -1}, "temperature", "temperature=-1", "a finite number >= 0"),
    ({"top_p": 0}, "top_p", "top_p=0", "(0, 1]"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens=0", "must be > 0"),
    ({"max_tokens": 10_000}, "max_tokens", "max_tokens=10000", "the context"),
    ({"logprobs": 50}, "logprobs", "logprobs=50", "[0, 20]"),
    ({"stop": [""]}, "stop", "stop[0]=''", "1 to 256 characters"),
    ({"stop": 5}, "stop", "stop=5", "a string or a list of strings"),
    ({"n": 2}, "n", "n=2", "allowed: 1"),
    ({"echo": True}, "echo", "echo=True", "not supported"),
    ({"temperature": "hot"}, "temperature", "temperature='hot'", "must be a valid number"),
    ({"max_tokens": 2.5}, "max_tokens", "max_tokens=2.5", "must be a valid integer"),
    ({"tools": []}, "tools", "tools: unknown field", "allowed: "),
    ({"prompt": ["a", "b"]}, "prompt", "prompt='<a batch of 2 prompts>'", "one prompt per request"),
    ({"prompt": []}, "prompt", "prompt=[]", "a string, or a non-empty list"),
    ({"prompt": [1, 99999]}, "prompt", "prompt[1]=99999", "out of vocabulary"),
    ({"prompt": ""}, "prompt", "prompt=''", "empty"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "stream_options=", "only with stream=true"),
]


@pytest.mark.parametrize(("fields", "param", "starts", "allowed"), BAD_COMPLETIONS)
def test_bad_completion_fields(server, model, fields, param, starts, allowed):
    error = _error(_post(server, "/v1/completions", {"model": model, "prompt": "hi", **fields}), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"].startswith(starts) and allowed in error["message"], error["message"]


def test_chat_shape_and_no_template(server, model):
    """The request's shape is checked first; then this checkpoint (no chat template) cannot go on. The
    engine's checks of chat fields: test_http_api.py, on a checkpoint with a template."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    error = _error(_post(server, "/v1/chat/completions", {**body, "top_logprobs": 2}), 400)
    assert error["message"] == "top_logprobs=2: needs logprobs=true"
    error = _error(_post(server, "/v1/chat/completions", {**body, "max_tokens": 2, "max_completion_tokens": 2}), 400)
    assert error["param"] == "max_completion_tokens" and "send one of them" in error["message"]
    error = _error(_post(server, "/v1/chat/completions", {"model": model}), 400)
    assert error["param"] == "messages" and "missing" in error["message"]
    # the tiny checkpoint has no chat template: a clear 400 naming the problem
    error = _error(_post(server, "/v1/chat/completions", body), 400)
    assert error["code"] == "chat_template_missing" and "no chat template" in error["message"]


def test_body_problems(server):
    error = _error(_post(server, "/v1/completions", b"{not json"), 400)
    assert error["code"] == "invalid_json" and error["message"].startswith("body: not valid JSON")
    error = _error(_post(server, "/v1/completions", b"[1, 2]"), 400)
    assert error["message"].startswith("body: not a JSON object")
    error = _error(_post(server, "/v1/completions", {"prompt": "x" * 5000}), 413)
    assert "server.max_request_bytes=4096" in error["message"] and error["code"] == "request_too_large"
    chunked = _post(server, "/v1/completions", iter([b'{"prompt": "', b"x" * 5000, b'"}']))  # no Content-Length
    assert _error(chunked, 413)["code"] == "request_too_large"


def test_prompt_too_long_for_the_cache(server, model):
    error = _error(_post(server, "/v1/completions", {"model": model, "prompt": [3] * 100, "max_tokens": 100}), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert error["message"].startswith("prompt: 100 prompt tokens") and "cache.num_blocks" in error["message"]


def test_unknown_model_route_and_method(server, model, client):
    error = _error(_post(server, "/v1/completions", {"model": "gpt-4", "prompt": "hi"}), 404)
    assert error["param"] == "model" and error["code"] == "model_not_found" and repr(model) in error["message"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    error = _error(_post(server, "/v1/embeddings", {"input": "hi"}), 404)
    assert "no such route" in error["message"] and "/v1/completions" in error["message"]
    error = _error(httpx2.get(server.http_url + "/v1/completions", timeout=10,
                              headers={"Authorization": "Bearer s3cret-token"}), 405)
    assert "POST" in error["message"]


def test_auth(server, model, openai_for):
    for token, says in ((None, "missing Authorization header"), ("wrong", "token is wrong")):
        error = _error(_post(server, "/v1/completions", {"model": model, "prompt": "hi"}, token=token), 401)
        assert error["type"] == "authentication_error" and says in error["message"]
    response = _post(server, "/v1/nothing-here", {}, token=None)
    assert response.status_code == 401  # routes are not revealed before auth
    assert httpx2.get(server.http_url + "/health", timeout=10).status_code == 200  # open, as gRPC health
    lower = httpx2.post(server.http_url + "/v1/completions", timeout=30, headers={"authorization": "bearer s3cret-token"},
                        json={"model": model, "prompt": "hi", "max_tokens": 2})
    assert lower.status_code == 200 and lower.json()["usage"]["completion_tokens"] <= 2
    with pytest.raises(openai.AuthenticationError):
        openai_for(server, api_key="nope").models.list()


def test_errors_are_logged_and_counted(server, model, caplog):
    caplog.set_level("INFO", logger="moe_runtime.server.requests")
    before = server.app.telemetry.finished_counts().get("invalid_argument", 0)
    _post(server, "/v1/completions", {"model": model, "prompt": "hi", "temperature": -1})
    assert server.app.telemetry.finished_counts().get("invalid_argument", 0) == before + 1
    line = next(r.getMessage() for r in caplog.records if '"protocol": "http"' in r.getMessage())
    assert '"status": "INVALID_ARGUMENT"' in line and '"http_status": 400' in line
