"""Checks a `GenerateRequest` before it reaches the engine. Every rejection names the field, the value and
what is allowed, and carries the gRPC status it maps to (INVALID_ARGUMENT or RESOURCE_EXHAUSTED)."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from moe_runtime.errors import RequestError
from moe_runtime.v1 import generation_pb2 as pb

DEFAULT_MAX_TOKENS = 16  # as the offline engine's SamplingParams


class RequestRejected(RequestError):
    """A request the server refuses, with the status code it answers."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def invalid(field: str, value: Any, allowed: str) -> RequestRejected:
    return RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, f"{field}={value!r}: {allowed}")


@dataclass(frozen=True)
class Limits:
    """What a request may ask of this server (from the model, the engine and the KV cache)."""

    vocab_size: int
    max_context: int  # prompt + completion tokens per request
    kv_capacity_tokens: int | None = None  # KV blocks x block size; None: unknown (not checked)
    max_stop: int = 16  # stop strings per request
    max_stop_chars: int = 256  # characters per stop string
    max_stop_token_ids: int = 64
    max_top_logprobs: int = 20
    max_request_id_chars: int = 128


@dataclass(frozen=True)
class ValidRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: dict[str, Any]  # keyword arguments of the engine's SamplingParams


def validate_request(req: pb.GenerateRequest, limits: Limits,
                     tokenize: Callable[[str], list[int]]) -> ValidRequest:
    """Check `req` field by field; raise `RequestRejected` naming the first bad field."""
    request_id = req.request_id or uuid.uuid4().hex
    if len(request_id) > limits.max_request_id_chars:
        raise invalid("request_id", request_id[:16] + "...", f"at most {limits.max_request_id_chars} characters")
    prompt_ids = _prompt_ids(req, limits, tokenize)
    sampling = _sampling(req.sampling_params, limits, len(prompt_ids))
    cap = limits.kv_capacity_tokens
    if cap is not None and len(prompt_ids) + sampling["max_tokens"] - 1 > cap:
        # The last sampled token is never written to the cache, hence the - 1.
        raise RequestRejected(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"prompt ({len(prompt_ids)} tokens) + sampling_params.max_tokens={sampling['max_tokens']} cannot fit "
            f"in the KV cache ({cap} tokens in all); allowed: prompt + max_tokens <= {cap + 1} (send less or "
            f"raise cache.num_blocks)",
        )
    return ValidRequest(request_id, prompt_ids, sampling)


def _prompt_ids(req: pb.GenerateRequest, limits: Limits, tokenize: Callable[[str], list[int]]) -> list[int]:
    has_text, has_ids = bool(req.prompt), len(req.prompt_token_ids) > 0
    if has_text and has_ids:
        raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT,
                              "prompt and prompt_token_ids are both set: send exactly one of them")
    if not has_text and not has_ids:
        raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT,
                              "prompt is empty and prompt_token_ids is empty: send exactly one of them")
    ids = list(req.prompt_token_ids) if has_ids else tokenize(req.prompt)
    if not ids:
        raise invalid("prompt", req.prompt, "tokenizes to no tokens; send non-empty text")
    for i, t in enumerate(ids):
        if not 0 <= t < limits.vocab_size:
            raise invalid(f"prompt_token_ids[{i}]", t, f"token ids must be in [0, {limits.vocab_size})")
    if len(ids) >= limits.max_context:
        raise invalid("prompt", f"<{len(ids)} tokens>",
                      f"longer than the context: at most {limits.max_context - 1} tokens leave room for output")
    return ids


def _sampling(sp: pb.SamplingParams, limits: Limits, prompt_len: int) -> dict[str, Any]:
    f = "sampling_params."
    room = limits.max_context - prompt_len
    max_tokens = sp.max_tokens if sp.HasField("max_tokens") else min(DEFAULT_MAX_TOKENS, room)
    if max_tokens <= 0:
        raise invalid(f + "max_tokens", max_tokens, f"must be > 0 (unset: {DEFAULT_MAX_TOKENS})")
    if max_tokens > room:
        raise invalid(f + "max_tokens", max_tokens, f"prompt ({prompt_len} tokens) + max_tokens must be <= the "
                      f"context ({limits.max_context}); at most {room} here")
    temperature = _float(sp, "temperature", 1.0)
    if math.isnan(temperature) or math.isinf(temperature) or temperature < 0:
        raise invalid(f + "temperature", temperature, "must be a finite number >= 0 (0 is greedy)")
    top_k = sp.top_k if sp.HasField("top_k") else -1
    if top_k < -1 or top_k == 0:
        raise invalid(f + "top_k", top_k, "must be -1 (off) or >= 1")
    top_p = _float(sp, "top_p", 1.0)
    if not 0 < top_p <= 1:  # also rejects NaN
        raise invalid(f + "top_p", top_p, "must be in (0, 1]")
    min_p = _float(sp, "min_p", 0.0)
    if not 0 <= min_p <= 1:
        raise invalid(f + "min_p", min_p, "must be in [0, 1]")
    if len(sp.stop) > limits.max_stop:
        raise invalid(f + "stop", f"<{len(sp.stop)} strings>", f"at most {limits.max_stop} stop strings")
    for i, s in enumerate(sp.stop):
        if not s or len(s) > limits.max_stop_chars:
            raise invalid(f"{f}stop[{i}]", s[:32], f"must be 1 to {limits.max_stop_chars} characters")
    if len(sp.stop_token_ids) > limits.max_stop_token_ids:
        raise invalid(f + "stop_token_ids", f"<{len(sp.stop_token_ids)} ids>",
                      f"at most {limits.max_stop_token_ids} ids")
    for i, t in enumerate(sp.stop_token_ids):
        if not 0 <= t < limits.vocab_size:
            raise invalid(f"{f}stop_token_ids[{i}]", t, f"token ids must be in [0, {limits.vocab_size})")
    if not 0 <= sp.top_logprobs <= limits.max_top_logprobs:
        raise invalid(f + "top_logprobs", sp.top_logprobs, f"must be in [0, {limits.max_top_logprobs}]")
    if sp.top_logprobs and not sp.logprobs:
        raise invalid(f + "top_logprobs", sp.top_logprobs, "needs sampling_params.logprobs=true")
    return {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "min_p": min_p,
        "seed": sp.seed if sp.HasField("seed") else None,
        "stop": list(sp.stop),
        "stop_token_ids": list(sp.stop_token_ids),
        "ignore_eos": sp.ignore_eos,
        "logprobs": sp.top_logprobs if sp.logprobs else None,  # None: off; n: chosen + n alternatives
    }


def _float(sp: pb.SamplingParams, name: str, default: float) -> float:
    return float(getattr(sp, name)) if sp.HasField(name) else default
