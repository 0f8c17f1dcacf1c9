"""Where a serving benchmark sends its requests: a `moe-runtime serve` over gRPC or over its OpenAI-compatible
HTTP API. Each target is an async context manager whose `send(item)` streams one request and returns what
the client saw (`RequestResult`), never raising for a refused or failed request (the error is recorded).

Both stream (the benchmark needs the first token's time), greedy unless told, with the output length fixed
by `max_tokens` and EOS ignored unless `stop_at_eos`. The token count comes from the server's usage (gRPC's
final chunk; HTTP's `stream_options.include_usage` chunk).
"""

from __future__ import annotations

import json
import ssl
import time
from pathlib import Path
from typing import Any

import grpc

from moe_runtime.bench.report import RequestResult
from moe_runtime.bench.workload import WorkItem
from moe_runtime.errors import ConfigError


def _ca_bytes(tls_ca: str) -> bytes:
    try:
        return Path(tls_ca).read_bytes()
    except OSError as e:
        raise ConfigError(f"--tls-ca {tls_ca}: cannot read ({e.strerror}); give the PEM CA certificate that signed "
                          "the server's") from None


class GrpcTarget:
    """`moe_runtime.v1.GenerationService/GenerateStream` on `grpc.aio` (one channel for all requests)."""

    def __init__(self, server: str, auth_token: str | None = None, tls_ca: str | None = None,
                 temperature: float = 0.0, stop_at_eos: bool = False, timeout_s: float = 600.0):
        self.server, self.auth_token, self.tls_ca = server, auth_token, tls_ca
        self.sampling = {"temperature": temperature, "ignore_eos": not stop_at_eos}
        self.timeout_s = timeout_s
        self.metadata = (("authorization", f"Bearer {auth_token}"),) if auth_token else ()
        self._channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> GrpcTarget:
        from moe_runtime.v1 import generation_pb2 as pb
        from moe_runtime.v1 import generation_pb2_grpc as pb_grpc

        if self.tls_ca:
            creds = grpc.ssl_channel_credentials(_ca_bytes(self.tls_ca))
            self._channel = grpc.aio.secure_channel(self.server, creds)
        else:
            self._channel = grpc.aio.insecure_channel(self.server)
        self._stub = pb_grpc.GenerationServiceStub(self._channel)
        try:  # fail now, with the server's reason, rather than N times
            await self._stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata, timeout=10)
        except grpc.aio.AioRpcError as e:
            await self._channel.close()
            raise ConfigError(f"--server {self.server}: {e.code().name}: {e.details()}") from None
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._channel.close()

    async def send(self, item: WorkItem) -> RequestResult:
        from moe_runtime.server.client import make_request

        request = make_request(prompt_token_ids=item.prompt_token_ids,
                               sampling={**self.sampling, "max_tokens": item.max_tokens})
        result = RequestResult(prompt_tokens=len(item.prompt_token_ids))
        result.start_s = time.perf_counter()
        try:
            async for chunk in self._stub.GenerateStream(request, metadata=self.metadata, timeout=self.timeout_s):
                if chunk.token_ids:
                    result.token_times.append(time.perf_counter())
                if chunk.finish_reason:
                    result.prompt_tokens = chunk.usage.prompt_tokens
                    result.output_tokens = chunk.usage.completion_tokens
        except grpc.aio.AioRpcError as e:
            result.error = f"{e.code().name}: {e.details()}"
        result.end_s = time.perf_counter()
        return result


class HttpTarget:
    """`POST /v1/completions` with `stream: true` (server-sent events), on one `httpx2.AsyncClient`."""

    def __init__(self, server: str, auth_token: str | None = None, tls_ca: str | None = None,
                 temperature: float = 0.0, stop_at_eos: bool = False, timeout_s: float = 600.0):
        scheme = "https" if tls_ca else "http"
        self.base = server if "://" in server else f"{scheme}://{server}"
        self.auth_token, self.tls_ca = auth_token, tls_ca
        self.extra = {"temperature": temperature, "ignore_eos": not stop_at_eos}
        self.timeout_s = timeout_s
        self.model: str | None = None
        self._client: Any = None

    async def __aenter__(self) -> HttpTarget:
        import httpx2

        headers = {"Authorization": f"Bearer {self.auth_token}"} if self.auth_token else {}
        verify: Any = ssl.create_default_context(cadata=_ca_bytes(self.tls_ca).decode()) if self.tls_ca else True
        # No pool limit: a request waiting for a pooled connection would count that wait as server latency.
        self._client = httpx2.AsyncClient(base_url=self.base, headers=headers, verify=verify,
                                          timeout=self.timeout_s, limits=httpx2.Limits(max_connections=None))
        try:
            models = await self._client.get("/v1/models", timeout=10)
        except httpx2.HTTPError as e:
            await self._client.aclose()
            raise ConfigError(f"--server {self.base}: cannot reach the HTTP API ({type(e).__name__}: {e})") from None
        if models.status_code != 200:
            await self._client.aclose()
            raise ConfigError(f"--server {self.base}: GET /v1/models answered {models.status_code}: "
                              f"{_error_message(models.content)}")
        self.model = models.json()["data"][0]["id"]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._client.aclose()

    async def send(self, item: WorkItem) -> RequestResult:
        import httpx2

        body = {"model": self.model, "prompt": item.prompt_token_ids, "max_tokens": item.max_tokens, "stream": True,
                "stream_options": {"include_usage": True}, **self.extra}
        result = RequestResult(prompt_tokens=len(item.prompt_token_ids))
        result.start_s = time.perf_counter()
        try:
            async with self._client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    result.error = f"HTTP {response.status_code}: {_error_message(await response.aread())}"
                else:
                    await self._read_events(response, result)
        except httpx2.HTTPError as e:
            result.error = f"{type(e).__name__}: {e}"
        result.end_s = time.perf_counter()
        return result

    @staticmethod
    async def _read_events(response: Any, result: RequestResult) -> None:
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                return
            event = json.loads(data)
            if "error" in event:
                result.error = f"stream error: {event['error'].get('message')}"
                return
            if event.get("choices"):  # one chunk per engine step with new tokens (its text may be held back)
                result.token_times.append(time.perf_counter())
            if event.get("usage"):
                result.prompt_tokens = event["usage"]["prompt_tokens"]
                result.output_tokens = event["usage"]["completion_tokens"]


def _error_message(body: bytes) -> str:
    """The message of an OpenAI-shaped error body, or the body itself."""
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body[:200].decode(errors="replace")
