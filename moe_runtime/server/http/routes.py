"""The OpenAI-compatible routes on Starlette: `/v1/completions`, `/v1/chat/completions`, `/v1/models`,
`/health`. The same engine, limits, request log line and telemetry as gRPC (grpc_server.py), request for
request:

    refuse when not serving (503) or the queue is full (429) -> read the body (413 past
    server.max_request_bytes) -> in a worker thread: parse, render the chat, tokenize (400 naming the field)
    -> stream the engine's outputs, as one JSON body or as server-sent events.

The first output is awaited before answering, so that the engine's own checks of the request
(`LLMEngine.make_request`) still answer with a status (400) rather than inside a 200 stream. While waiting,
and for a whole non-streamed request, a watcher on the connection cancels the work when the client goes
away; Starlette does the same for a stream. Either way the engine request is aborted (`AsyncEngine.generate`
closed) and its KV blocks are freed before the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive

from moe_runtime.config import ServerConfig
from moe_runtime.errors import EngineDeadError, MissingTokenizerError, RequestError
from moe_runtime.server.health import Phase, ServingState
from moe_runtime.server.http import sse
from moe_runtime.server.http.admission import Admitted, Kind, admit
from moe_runtime.server.http.auth import BearerAuth
from moe_runtime.server.http.chat_template import ChatTemplate, ChatTemplateError
from moe_runtime.server.http.errors import EXCEPTION_HANDLERS, ApiError, engine_error
from moe_runtime.server.http.openai_format import ResponseBuilder, TokenTexts
from moe_runtime.server.request_log import RequestRecord
from moe_runtime.telemetry import Telemetry

SHUTTING_DOWN = "server shutting down: the drain grace (server.drain_grace_s) ran out; retry on another replica"


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


@dataclass
class HttpBackend:
    """What the routes need once the model is loaded."""

    engine: Any  # AsyncEngine
    telemetry: Telemetry
    model_id: str
    max_context: int  # tokens, prompt + completion
    chat_template: ChatTemplate | ChatTemplateError  # the checkpoint's, or why it has none
    texts: TokenTexts
    created: int  # unix seconds the model was loaded (/v1/models)


class OpenAIService:
    """Serves from `backend` once `attach`ed; until then (loading) every generation answers 503.
    `app` is the ASGI application (with Bearer auth in front when `auth_token` is given)."""

    def __init__(self, state: ServingState, cfg: ServerConfig, auth_token: str | None = None):
        self.state = state
        self.max_queued_requests = cfg.max_queued_requests
        self.max_request_bytes = cfg.max_request_bytes
        self.backend: HttpBackend | None = None
        self.in_flight: set[str] = set()  # request ids this server is generating for now
        self.shutting_down = False  # set by `end_in_flight`: aborted requests then answer 503 SHUTTING_DOWN
        routes = [Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"])]
        app = Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS)
        self.app: ASGIApp = BearerAuth(app, auth_token) if auth_token else app

    def attach(self, backend: HttpBackend) -> None:
        self.backend = backend

    async def end_in_flight(self) -> None:
        """Abort every in-flight request in the engine; they answer 503 `SHUTTING_DOWN` (the drain grace ran
        out), as an error event when their stream had started."""
        self.shutting_down = True
        for request_id in list(self.in_flight):
            await self.backend.engine.abort(request_id)

    # -- introspection -------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        """200 while serving; 503 while loading, draining, recovering a worker, or with a dead engine."""
        dead = self.backend is not None and self.backend.engine.is_dead
        phase = Phase.DEAD if dead else self.state.phase
        return JSONResponse({"status": phase.value}, 200 if phase is Phase.SERVING else 503)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_entry(self._loaded())]})

    async def model(self, request: Request) -> Response:
        backend = self._loaded()
        asked = request.path_params["model_id"]
        if asked != backend.model_id:
            raise ApiError(404, f"model={asked!r}: not served here; allowed: {backend.model_id!r}", "model",
                           "model_not_found")
        return JSONResponse(self._model_entry(backend))

    @staticmethod
    def _model_entry(b: HttpBackend) -> dict[str, Any]:
        return {"id": b.model_id, "object": "model", "created": b.created, "owned_by": "moe-runtime",
                "max_model_len": b.max_context}

    def _loaded(self) -> HttpBackend:
        if self.backend is None:
            raise ApiError(503, f"server is {self.state.phase.value}; retry shortly", code="not_ready",
                           headers={"Retry-After": "1"})
        return self.backend

    # -- generation ----------------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self._generate("completion", request)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate("chat", request)

    async def _generate(self, kind: Kind, request: Request) -> Response:
        started = time.monotonic()
        record = RequestRecord("http", request.url.path)
        try:
            backend = self._accepting()
            body = await _read_body(request, self.max_request_bytes)
            admitted = await asyncio.to_thread(admit, kind, body, backend.model_id, backend.engine.encode,
                                               backend.chat_template)  # parses and tokenizes: off the loop
        except ApiError as e:
            record.status, record.http_status = e.grpc_status, e.status
            record.finish(self.backend.telemetry if self.backend else None, started)
            raise
        record.request_id = admitted.request_id
        builder = ResponseBuilder(kind, admitted.request_id, backend.model_id, backend.texts, admitted.include_usage)
        outputs = self._run(backend, admitted, record, started)
        try:
            if not admitted.stream:
                body = builder.final(await _unless_disconnected(_collect(outputs), request.receive))
                return JSONResponse(body)
            first = await _unless_disconnected(anext(outputs), request.receive)
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"
        # The background close covers a client gone before the first event: then the body is never iterated.
        return StreamingResponse(sse.sse_stream(self._chunks(builder, first, outputs, admitted.include_usage)),
                                 media_type=sse.MEDIA_TYPE, headers=sse.HEADERS,
                                 background=BackgroundTask(outputs.aclose))

    @staticmethod
    async def _chunks(builder: ResponseBuilder, first: Any, outputs: AsyncGenerator[Any, None],
                      include_usage: bool) -> AsyncGenerator[dict[str, Any], None]:
        async with contextlib.aclosing(outputs):
            last = first
            yield builder.chunk(first)
            async for out in outputs:
                last = out
                yield builder.chunk(out)
            if include_usage:
                yield builder.usage_chunk(last)

    def _accepting(self) -> HttpBackend:
        """The backend when a new request may start; else 503 (loading, draining, engine down) or 429."""
        b = self.backend
        if b is not None and b.engine.is_dead:
            raise ApiError(503, f"engine is down: {b.engine.dead_error}", code="engine_unavailable")
        if b is None or not self.state.accepting:
            raise ApiError(503, f"server is {self.state.phase.value}; retry another replica", code="not_serving",
                           headers={"Retry-After": "1"})
        if b.engine.num_waiting >= self.max_queued_requests:
            raise ApiError(429, f"queue full: {b.engine.num_waiting} requests waiting (server.max_queued_requests="
                                f"{self.max_queued_requests}); retry later", code="queue_full",
                           headers={"Retry-After": "1"})
        return b

    async def _run(self, backend: HttpBackend, a: Admitted, record: RequestRecord,
                   started: float) -> AsyncGenerator[Any, None]:
        """The engine's outputs for `a`; engine errors become `ApiError`s. Closing it early (the client went
        away) aborts the request. Ends the request's log line."""
        self.in_flight.add(a.request_id)
        stream = backend.engine.generate(a.request_id, a.prompt_token_ids, a.params)
        answered = False  # a stream's 200 is out once its first output is
        try:
            async for out in stream:
                record.last = out
                if out.finish_reason == "abort":
                    raise ApiError(503, SHUTTING_DOWN if self.shutting_down else "the server aborted this request",
                                   code="shutting_down" if self.shutting_down else "aborted")
                answered = a.stream
                yield out
            record.http_status = 200
        except (asyncio.CancelledError, GeneratorExit):
            record.status, record.http_status = "CANCELLED", 200 if answered else None
            raise
        except ApiError as e:
            record.status, record.http_status = e.grpc_status, 200 if answered else e.status
            raise
        except (RequestError, MissingTokenizerError, EngineDeadError) as e:  # the engine's checks, or a dead engine
            error = engine_error(e, a.names)
            record.status, record.http_status = error.grpc_status, 200 if answered else error.status
            raise error from None
        finally:
            self.in_flight.discard(a.request_id)
            await stream.aclose()  # not finished: the engine aborts the request and frees its KV blocks
            record.finish(backend.telemetry, started)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to pass `limit` bytes (by Content-Length, or while
    reading), never held whole beyond it."""
    too_large = ApiError(413, f"request body larger than server.max_request_bytes={limit} bytes; send less",
                         code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_large
        parts.append(part)
    return b"".join(parts)


async def _collect(outputs: AsyncGenerator[Any, None]) -> list[Any]:
    async with contextlib.aclosing(outputs):
        return [out async for out in outputs]


async def _unless_disconnected(work: Awaitable[Any], receive: Receive) -> Any:
    """`work`'s result; `ClientGone` (with `work` cancelled) if the client disconnects first. The request body
    is read by then, so the next ASGI message can only be the disconnect."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientGone
    return task.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
