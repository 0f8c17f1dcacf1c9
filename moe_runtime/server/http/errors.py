"""Errors of the HTTP API in OpenAI's shape, and the engine's typed errors mapped onto it.

Every refusal is an `ApiError`: the HTTP status, and the body OpenAI's clients parse,

    {"error": {"message": "temperature=-1.0: invalid; allowed: a finite number >= 0 (0 is greedy)",
               "type": "invalid_request_error", "param": "temperature", "code": "invalid_value"}}

The engine names its own fields (`SamplingParams`, `LLMEngine.make_request` / `encode`); `engine_error`
renames them to this API's (chat's `top_logprobs` is the engine's `logprobs`, a completion's `prompt` given
as token ids is the engine's `prompt_token_ids`, ...), keeping the engine's wording of the problem. Each
status also has the gRPC status name the request log and `requests_finished{reason}` count it under, so
both protocols share one bounded label set.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from moe_runtime.errors import CapacityError, EngineDeadError, MissingTokenizerError, RequestError

log = logging.getLogger(__name__)

# HTTP status -> (OpenAI error type, the gRPC status name for the log line and the metric)
STATUS = {
    400: ("invalid_request_error", "INVALID_ARGUMENT"),
    401: ("authentication_error", "UNAUTHENTICATED"),
    404: ("not_found_error", "NOT_FOUND"),
    405: ("invalid_request_error", "UNIMPLEMENTED"),
    413: ("invalid_request_error", "RESOURCE_EXHAUSTED"),
    429: ("rate_limit_error", "RESOURCE_EXHAUSTED"),
    500: ("server_error", "INTERNAL"),
    503: ("service_unavailable_error", "UNAVAILABLE"),
}


class ApiError(Exception):
    """A request refused with HTTP `status`; `param` is the request field at fault (None: the request as a
    whole), `code` a short machine-readable reason."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        if status not in STATUS:
            raise ValueError(f"status={status}: no OpenAI error type for it; allowed: {sorted(STATUS)}")
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    @property
    def grpc_status(self) -> str:
        return STATUS[self.status][1]

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": STATUS[self.status][0], "param": self.param,
                          "code": self.code}}


def invalid(param: str, value: Any, allowed: str, code: str = "invalid_value") -> ApiError:
    """400 for one field: `param=value: allowed`, the house shape of a bad-input message."""
    shown = repr(value)
    return ApiError(400, f"{param}={shown if len(shown) <= 80 else shown[:77] + '...'}: {allowed}", param, code)


def engine_error(error: Exception, names: dict[str, str]) -> ApiError:
    """The `ApiError` for an error the engine raised about a request. `names` maps the engine's field names
    to this request's (e.g. {"logprobs": "top_logprobs", "prompt_token_ids": "messages"}); a message that
    starts with the engine's name is reworded to start with the request's."""
    if isinstance(error, EngineDeadError):
        return ApiError(503, f"engine is down: {error}", code="engine_unavailable")
    if isinstance(error, MissingTokenizerError):
        return ApiError(400, f"{error} (over HTTP: send `prompt` as a list of token ids, `stop_token_ids` for "
                             "stops)", code="tokenizer_missing")
    if not isinstance(error, RequestError):
        raise TypeError(f"{type(error).__name__} is not a request error: {error}")
    message, field = str(error), error.field
    param = names.get(field, field) if field is not None else None
    if field is not None and param != field and message.startswith(field):
        message = param + message[len(field):]
    code = "context_length_exceeded" if isinstance(error, CapacityError) else "invalid_value"
    return ApiError(400, message, param, code)


# -- Starlette's exception handlers: every error answers in OpenAI's shape ----------------------------------
async def _api_error(request: Request, e: Exception) -> Response:
    assert isinstance(e, ApiError)
    return JSONResponse(e.body(), e.status, e.headers)


async def _http_error(request: Request, e: Exception) -> Response:
    """Starlette's own refusals: an unknown path (404) or method (405)."""
    assert isinstance(e, HTTPException)
    if e.status_code == 405:
        error = ApiError(405, f"{request.method} {request.url.path}: method not allowed; allowed: "
                              f"{(e.headers or {}).get('Allow', '')}", code="method_not_allowed")
    elif e.status_code == 404:
        error = ApiError(404, f"{request.url.path}: no such route; this server has POST /v1/completions, POST "
                              "/v1/chat/completions, GET /v1/models, GET /health", code="not_found")
    elif e.status_code in STATUS:
        error = ApiError(e.status_code, f"{request.url.path}: {e.detail}", code="http_error")
    else:
        error = ApiError(500, f"{request.url.path}: {e.status_code} {e.detail}", code="http_error")
    return JSONResponse(error.body(), error.status, {**(e.headers or {}), **error.headers})


async def _internal_error(request: Request, e: Exception) -> Response:
    log.error("HTTP %s %s failed", request.method, request.url.path, exc_info=e)
    # The details stay in the server's log: a client learns only that it was not its request's fault.
    error = ApiError(500, f"internal error ({type(e).__name__}); the server's log has the details",
                     code="internal_error")
    return JSONResponse(error.body(), 500)


EXCEPTION_HANDLERS = {ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error}
