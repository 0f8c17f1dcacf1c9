"""A small synchronous client for the CLI (`generate --server`, `stats --server`) and scripts.

    client = GenerationClient("127.0.0.1:50051")
    for chunk in client.generate_stream(prompt="Hello", sampling={"max_tokens": 16}):
        print(chunk.text, end="")
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from moe_runtime.errors import ConfigError, MoeRuntimeError
from moe_runtime.server.convert import FINISH_REASON_NAMES, stats_to_dict
from moe_runtime.v1 import generation_pb2 as pb
from moe_runtime.v1 import generation_pb2_grpc as pb_grpc

SAMPLING_FIELDS = tuple(pb.SamplingParams.DESCRIPTOR.fields_by_name)
PROBE_TIMEOUT_S = 2.0


class ClientError(MoeRuntimeError):
    """The server answered with an error status (the message names the code and the server's reason)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code


def sampling_params(**kwargs: Any) -> pb.SamplingParams:
    """Build `SamplingParams` from keyword arguments; None values stay unset (server defaults)."""
    unknown = set(kwargs) - set(SAMPLING_FIELDS)
    if unknown:
        raise ValueError(f"unknown sampling field(s) {sorted(unknown)}; allowed: {list(SAMPLING_FIELDS)}")
    return pb.SamplingParams(**{k: v for k, v in kwargs.items() if v is not None})


def make_request(prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                 sampling: dict[str, Any] | None = None, request_id: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=request_id, prompt=prompt or "", prompt_token_ids=prompt_token_ids or [],
                              sampling_params=sampling_params(**(sampling or {})))


class GenerationClient:
    """One channel to a server. `auth_token` adds `authorization: Bearer ...`; `tls_ca` (PEM path) turns TLS on."""

    def __init__(self, target: str, auth_token: str | None = None, tls_ca: str | None = None,
                 timeout_s: float | None = None):
        self.target, self.tls = target, bool(tls_ca)
        if tls_ca:
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(_read_ca(tls_ca)))
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.GenerationServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {auth_token}"),) if auth_token else ()
        self.timeout_s = timeout_s

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> GenerationClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, metadata=self.metadata, timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise self._error(e) from None

    def _error(self, e: grpc.RpcError) -> ClientError:
        """The call's error; when the connection failed, what was wrong with TLS if that was it. grpc says
        only "Socket closed" when a plaintext client meets a TLS server, so ask the server directly."""
        if e.code() == grpc.StatusCode.UNAVAILABLE and "failed to connect" in (e.details() or ""):
            speaks_tls = _speaks_tls(self.target)
            if speaks_tls and not self.tls:
                return ClientError(e.code(), f"server requires TLS: pass --tls-ca CA.pem (the CA certificate that "
                                             f"signed the server's) ({e.details()})")
            if speaks_tls is False and self.tls:
                return ClientError(e.code(), f"server does not use TLS: drop --tls-ca ({e.details()})")
            if self.tls and "CERTIFICATE_VERIFY_FAILED" in e.details():
                return ClientError(e.code(), "the server's certificate is not signed by --tls-ca (or does not name "
                                             f"{self.target.rsplit(':', 1)[0]}): pass the CA that signed it "
                                             f"({e.details()})")
        return ClientError(e.code(), e.details())

    def generate(self, request: pb.GenerateRequest) -> pb.GenerateResponse:
        return self._call(self.stub.Generate, request)

    def generate_stream(self, request: pb.GenerateRequest) -> Iterator[pb.GenerateResponse]:
        stream = self.stub.GenerateStream(request, metadata=self.metadata, timeout=self.timeout_s)
        try:
            yield from stream
        except grpc.RpcError as e:
            raise self._error(e) from None
        finally:
            stream.cancel()  # no-op when finished; aborts the request if the caller stopped early

    def abort(self, request_id: str) -> bool:
        return self._call(self.stub.Abort, pb.AbortRequest(request_id=request_id)).aborted

    def model_info(self) -> pb.ModelInfo:
        return self._call(self.stub.GetModelInfo, pb.GetModelInfoRequest())

    def apply_placement(self, placement_yaml: str) -> pb.ApplyPlacementResponse:
        return self._call(self.stub.ApplyPlacement, pb.ApplyPlacementRequest(placement_yaml=placement_yaml))

    def expert_stats(self) -> dict[str, Any]:
        """The telemetry snapshot as the JSON-able dict the placement planner reads."""
        return stats_to_dict(self._call(self.stub.GetExpertStats, pb.GetExpertStatsRequest()))


def _read_ca(path: str) -> bytes:
    try:
        pem = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"--tls-ca {path}: cannot read ({e.strerror}); give the PEM CA certificate that signed "
                          "the server's certificate") from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise ConfigError(f"--tls-ca {path}: no PEM certificate in it (BEGIN CERTIFICATE); give the CA certificate "
                          "that signed the server's")
    return pem


def _speaks_tls(target: str) -> bool | None:
    """Whether the server at HOST:PORT answers a TLS handshake (certificates unchecked: this only asks which
    protocol it speaks); None when it cannot be reached."""
    host, _, port = target.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S) as sock:
            with context.wrap_socket(sock):
                return True
    except ssl.SSLError:
        return False  # something answered, not with TLS
    except (OSError, ValueError):
        return None


def response_to_dict(resp: pb.GenerateResponse) -> dict[str, Any]:
    """A final (unary or accumulated) response as JSON-able data."""
    out: dict[str, Any] = {
        "request_id": resp.request_id,
        "text": resp.text,
        "token_ids": list(resp.token_ids),
        "finish_reason": FINISH_REASON_NAMES.get(resp.finish_reason, ""),
        "usage": {"prompt_tokens": resp.usage.prompt_tokens, "completion_tokens": resp.usage.completion_tokens},
        "timings": {"queue_s": resp.timings.queue_s, "time_to_first_token_s": resp.timings.time_to_first_token_s,
                    "total_s": resp.timings.total_s},
    }
    if resp.logprobs:
        out["logprobs"] = [{"token_id": lp.token_id, "logprob": lp.logprob,
                            "top": [[t.token_id, t.logprob] for t in lp.top]} for lp in resp.logprobs]
    return out


def accumulate(chunks: Iterator[pb.GenerateResponse]) -> Iterator[tuple[pb.GenerateResponse, pb.GenerateResponse]]:
    """Yield (chunk, running total) over a stream; the last total equals what `Generate` returns."""
    total = pb.GenerateResponse()
    for chunk in chunks:
        total.request_id = chunk.request_id
        total.text += chunk.text
        total.token_ids.extend(chunk.token_ids)
        total.logprobs.extend(chunk.logprobs)
        if chunk.finish_reason:
            total.finish_reason = chunk.finish_reason
            total.usage.CopyFrom(chunk.usage)
            total.timings.CopyFrom(chunk.timings)
        yield chunk, total


def offline_record(resp: pb.GenerateResponse) -> dict[str, Any]:
    """The record `moe-runtime generate --json` prints offline, from a final response (same keys)."""
    reason = FINISH_REASON_NAMES.get(resp.finish_reason, "")
    record: dict[str, Any] = {
        "token_ids": list(resp.token_ids),
        "text": resp.text,
        "finish_reason": "stop" if reason == "eos" else reason,
        "num_prompt_tokens": resp.usage.prompt_tokens,
        "num_output_tokens": resp.usage.completion_tokens,
    }
    if resp.logprobs:
        record["logprobs"] = [{"token_id": lp.token_id, "logprob": lp.logprob,
                               "top": [[t.token_id, t.logprob] for t in lp.top]} for lp in resp.logprobs]
    return record


def run_generate(args: Any, prompts: list[str | list[int]]) -> int:
    """`moe-runtime generate --server HOST:PORT ...`: the offline flags, over gRPC, one prompt after another.

    Streams each completion's text to stdout as it arrives; with `--json` prints one record per prompt.
    """
    sampling = {
        "max_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
        "min_p": args.min_p, "seed": args.seed, "stop": list(args.stop), "stop_token_ids": list(args.stop_token_ids),
        "ignore_eos": args.ignore_eos, "logprobs": args.logprobs is not None, "top_logprobs": args.logprobs or 0,
    }
    with GenerationClient(args.server, args.env["auth_token"], args.tls_ca, args.timeout) as client:
        for prompt in prompts:
            text_prompt = prompt if isinstance(prompt, str) else None
            ids = None if isinstance(prompt, str) else prompt
            total = pb.GenerateResponse()
            try:
                for chunk, running in accumulate(client.generate_stream(make_request(text_prompt, ids, sampling))):
                    total = running
                    if not args.json:
                        print(chunk.text, end="", flush=True)
            except ClientError as e:
                if e.code != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                print(f"moe-runtime generate: error: {e}", file=sys.stderr)
                return 2  # a bad request, as offline
            print(json.dumps(offline_record(total), ensure_ascii=False) if args.json else "", flush=True)
    return 0
