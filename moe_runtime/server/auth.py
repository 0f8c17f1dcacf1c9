"""Bearer-token auth: an interceptor that answers UNAUTHENTICATED unless the call's `authorization`
metadata is `Bearer <token>`. The scheme is case-insensitive (RFC 7235: `bearer`, `BEARER` do too), the
token is compared in constant time. Health checks stay open so that load balancers and orchestrators can
probe the server without the secret. A denied call is answered without parsing its request, so that an
unauthenticated client learns UNAUTHENTICATED, never how its bytes parse (decoding.py comes after)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import grpc

OPEN_SERVICES = ("/grpc.health.v1.Health/",)


def _deny_behavior(message: str, streaming_response: bool):
    async def deny_unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover (makes this an async generator)

    return deny_stream if streaming_response else deny_unary


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        if not token:
            raise ValueError("auth token is empty; give a non-empty token or disable auth")
        self._expected = token.encode()

    def _allowed(self, metadata) -> bool:
        got = next((v for k, v in metadata or () if k == "authorization"), None)
        if got is None:
            return False
        got = got.encode() if isinstance(got, str) else bytes(got)
        scheme, _, credentials = got.partition(b" ")
        # compare_digest on every call, even with the wrong scheme: the time taken says nothing of the token
        matches = hmac.compare_digest(credentials.lstrip(b" "), self._expected)
        return scheme.lower() == b"bearer" and matches

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(OPEN_SERVICES) or self._allowed(details.invocation_metadata):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None
        missing = not any(k == "authorization" for k, _ in details.invocation_metadata or ())
        message = ("missing authorization metadata; send 'authorization: Bearer <token>'" if missing
                   else "authorization token is wrong")
        behavior = _deny_behavior(message, handler.response_streaming)
        # No request deserializer: the request stays raw bytes and is never parsed (garbage from an
        # unauthenticated client gets UNAUTHENTICATED like anything else).
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(behavior, None, handler.response_serializer)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(behavior, None, handler.response_serializer)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(behavior, None, handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(behavior, None, handler.response_serializer)
