"""From a `GenerateRequest` on the wire to what the engine takes, and engine errors back to gRPC statuses.

Only what is particular to the wire is checked here: exactly one of `prompt` and `prompt_token_ids`, the
request id's length, and `top_logprobs` needing `logprobs`. Every other field is the engine's to check, once
(`SamplingParams.validate`, `LLMEngine.make_request`); `status_of` maps its typed errors to a status code
and the proto's field names (`sampling_params.top_p=...`).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from moe_runtime.engine.sampling_params import SamplingParams
from moe_runtime.errors import CapacityError, MissingTokenizerError, RequestError
from moe_runtime.v1 import generation_pb2 as pb

MAX_REQUEST_ID_CHARS = 128
COPY_CHUNK_IDS = 1 << 16  # ~2 ms of copying per slice
# SamplingParams fields that the proto nests under `sampling_params` (the engine names them bare), and the
# one the proto spells otherwise (the engine's `logprobs=n` is the proto's `logprobs=true, top_logprobs=n`).
SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))
WIRE_NAMES = {"logprobs": "top_logprobs"}


class RequestRejected(RequestError):
    """A request the server refuses, with the status code it answers."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def invalid(field: str, value: Any, allowed: str) -> RequestRejected:
    return RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, f"{field}={value!r}: {allowed}")


@dataclass(frozen=True)
class WireRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


def from_proto(req: pb.GenerateRequest, encode: Callable[[str], list[int]]) -> WireRequest:
    """The engine's view of `req` (`encode` tokenizes a text prompt and checks the text). Raises
    `RequestRejected` for a wire-level problem; engine-level problems surface when the engine makes the
    request. Tokenizing takes up to seconds: the server calls this in a thread, off its event loop."""
    request_id = req.request_id or uuid.uuid4().hex
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise invalid("request_id", request_id[:16] + "...", f"at most {MAX_REQUEST_ID_CHARS} characters")
    has_text, has_ids = bool(req.prompt), len(req.prompt_token_ids) > 0
    if has_text and has_ids:
        raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT,
                              "prompt and prompt_token_ids are both set: send exactly one of them")
    if not has_text and not has_ids:
        raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT,
                              "prompt is empty and prompt_token_ids is empty: send exactly one of them")
    ids = _copy_ids(req.prompt_token_ids) if has_ids else encode(req.prompt)
    return WireRequest(request_id, ids, _params(req.sampling_params))


def _copy_ids(ids: Any) -> list[int]:
    """The repeated field as a list, a slice at a time: one `list()` of 4M ids holds the GIL for ~120 ms in a
    single C call, which would stall the event loop this runs beside."""
    out: list[int] = []
    for start in range(0, len(ids), COPY_CHUNK_IDS):
        out.extend(ids[start:start + COPY_CHUNK_IDS])
    return out


def _params(sp: pb.SamplingParams) -> SamplingParams:
    """Proto3 optional fields left unset take the engine's defaults."""
    if sp.top_logprobs and not sp.logprobs:
        raise invalid("sampling_params.top_logprobs", sp.top_logprobs, "needs sampling_params.logprobs=true")
    set_fields = {name: getattr(sp, name) for name in ("max_tokens", "temperature", "top_k", "top_p", "min_p",
                                                       "seed") if sp.HasField(name)}
    return SamplingParams(
        **set_fields,
        stop=tuple(sp.stop),
        stop_token_ids=tuple(sp.stop_token_ids),
        ignore_eos=sp.ignore_eos,
        logprobs=sp.top_logprobs if sp.logprobs else None,  # None: off; n: chosen + n alternatives
    )


def status_of(error: RequestError | MissingTokenizerError) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message for an error the engine raised about a request."""
    if isinstance(error, RequestRejected):
        return error.code, str(error)
    if isinstance(error, MissingTokenizerError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(error)
    message, field = str(error), error.field
    if field in SAMPLING_FIELDS:
        message = "sampling_params." + WIRE_NAMES.get(field, field) + message.removeprefix(field)
    if isinstance(error, CapacityError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, message
    return grpc.StatusCode.INVALID_ARGUMENT, message
