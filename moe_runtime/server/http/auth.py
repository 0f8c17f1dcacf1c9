"""Bearer-token auth for the HTTP API: the same token as gRPC (MOE_RUNTIME_AUTH_TOKEN, read in cli.py), the
same rule (`Authorization: Bearer <token>`, the scheme case-insensitive, the token compared in constant
time). `/health` stays open, as gRPC's health service does, for load balancers and orchestrators. A denied
request is answered 401 before its body is read, whatever its path (an unauthenticated client learns
neither which routes exist nor how its bytes parse)."""

from __future__ import annotations

import hmac

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from moe_runtime.server.http.errors import ApiError

OPEN_PATHS = frozenset({"/health"})


def bearer_matches(header: bytes | None, expected: bytes) -> bool:
    """Whether an `Authorization` header value carries `Bearer <expected>`."""
    if header is None:
        return False
    scheme, _, credentials = header.partition(b" ")
    # compare_digest even with the wrong scheme: the time taken says nothing of the token
    matches = hmac.compare_digest(credentials.lstrip(b" "), expected)
    return scheme.lower() == b"bearer" and matches


class BearerAuth:
    """ASGI middleware: 401 in OpenAI's error shape unless the request carries the token."""

    def __init__(self, app: ASGIApp, token: str):
        if not token:
            raise ValueError("auth token is empty; give a non-empty token or disable auth")
        self.app = app
        self._expected = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if bearer_matches(header, self._expected):
            await self.app(scope, receive, send)
            return
        message = ("missing Authorization header; send 'Authorization: Bearer <token>'" if header is None
                   else "authorization token is wrong")
        error = ApiError(401, message, code="invalid_api_key")
        await JSONResponse(error.body(), 401, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
