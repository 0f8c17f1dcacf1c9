"""Requests that do not parse answer INVALID_ARGUMENT, not UNKNOWN with a traceback in the server log.

grpc parses a request after the interceptors have picked its handler and before the handler runs. A
`DecodeError` there (invalid UTF-8 in a string field, truncated or garbage bytes) used to escape as
`UNKNOWN: Unexpected DecodeError` with an ERROR traceback per call, for any client, authenticated or not.
`DecodeErrorInterceptor`, last in the chain, gives every method a deserializer that returns `Undecodable`
instead of raising, and wraps the method so that such a request is refused with INVALID_ARGUMENT and one
request log line. Calls that auth denies never get here: auth.py answers UNAUTHENTICATED without parsing.

Every handler this server registers is async (a coroutine, or an async generator for streamed responses);
the wrappers keep that shape, which is how grpc.aio tells async handlers from ones it runs in threads.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

request_log = logging.getLogger("moe_runtime.server.requests")


@dataclass(frozen=True)
class Undecodable:
    """What the tolerant deserializer returns for bytes that are not the method's request message."""

    reason: str  # protobuf's, e.g. "Error parsing message with type 'X': String field had bad UTF-8"


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except DecodeError as e:
            return Undecodable(str(e))

    return deserialize


async def _refuse(context: grpc.aio.ServicerContext, method: str, request: Undecodable) -> None:
    request_log.info(json.dumps({"event": "request", "rpc": method.rsplit("/", 1)[-1], "method": method,
                                 "status": "INVALID_ARGUMENT", "error": request.reason}))
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"request: not a valid protobuf message for {method} ({request.reason}); string fields "
                        "must be UTF-8: send the message your generated stub builds")


def _checked_unary(fn: Callable, method: str) -> Callable:
    """A unary-request behaviour that refuses an `Undecodable` request first."""
    if inspect.isasyncgenfunction(fn):
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                await _refuse(context, method, request)
            # aclosing: when grpc closes this generator (cancel, deadline), close the handler's now too
            async with contextlib.aclosing(fn(request, context)) as responses:
                async for response in responses:
                    yield response

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await _refuse(context, method, request)
        return await fn(request, context)

    return unary


def _checked_streaming(fn: Callable, method: str) -> Callable:
    """A streaming-request behaviour whose request iterator refuses the first `Undecodable` message."""

    async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, Undecodable):
                await _refuse(context, method, request)
            yield request

    if inspect.isasyncgenfunction(fn):
        async def stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with contextlib.aclosing(fn(checked(requests, context), context)) as responses:
                async for response in responses:
                    yield response

        return stream

    async def unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        return await fn(checked(requests, context), context)

    return unary


def tolerant_handler(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """`handler` with a deserializer that never raises and a behaviour that refuses what did not parse."""
    d = _tolerant(handler.request_deserializer)
    if handler.request_streaming and handler.response_streaming:
        return handler._replace(request_deserializer=d, stream_stream=_checked_streaming(handler.stream_stream, method))
    if handler.request_streaming:
        return handler._replace(request_deserializer=d, stream_unary=_checked_streaming(handler.stream_unary, method))
    if handler.response_streaming:
        return handler._replace(request_deserializer=d, unary_stream=_checked_unary(handler.unary_stream, method))
    return handler._replace(request_deserializer=d, unary_unary=_checked_unary(handler.unary_unary, method))


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    """Installs `tolerant_handler` on every method (health and reflection included: they are open to all)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:  # unknown method, or raw bytes wanted
            return handler
        return tolerant_handler(handler, details.method)
