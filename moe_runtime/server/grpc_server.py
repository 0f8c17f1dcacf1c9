"""`moe_runtime.v1.GenerationService` on `grpc.aio`, and the `grpc.aio.Server` around it.

A generation call: refuse when not serving (UNAVAILABLE) -> validate (INVALID_ARGUMENT naming the field,
RESOURCE_EXHAUSTED when the queue is full or the prompt cannot fit) -> stream the engine's outputs. When the
client cancels or its deadline passes, grpc.aio cancels the handler (`asyncio.CancelledError`;
`context.cancelled()` stays False), and the handler aborts the request in the engine, which frees its KV
blocks. Each request ends with one JSON log line (request_log.py: id, tokens, timings, finish reason or status).

Nothing slow runs on the event loop, which every stream and health check shares: the request is converted
and its text tokenized in a worker thread (the tokenizer releases the GIL; text that cannot fit the context
is refused before tokenizing), and detokenizing happens on the engine's step thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from moe_runtime.config import ServerConfig
from moe_runtime.errors import (
    ConfigError,
    EngineDeadError,
    MissingTokenizerError,
    MoeRuntimeError,
    RequestError,
    UnsupportedError,
)
from moe_runtime.server.auth import BearerTokenInterceptor
from moe_runtime.server.convert import chunk_to_proto, final_fields, logprobs_to_proto, snapshot_to_proto
from moe_runtime.server.decoding import DecodeErrorInterceptor
from moe_runtime.server.health import ServingState
from moe_runtime.server.reflection import enable_reflection
from moe_runtime.server.request_log import RequestRecord
from moe_runtime.server.tls import server_credentials
from moe_runtime.server.validation import RequestRejected, WireRequest, from_proto, status_of
from moe_runtime.telemetry import Telemetry
from moe_runtime.v1 import generation_pb2 as pb
from moe_runtime.v1 import generation_pb2_grpc as pb_grpc


class ServerError(MoeRuntimeError):
    """The server cannot start (port taken, TLS files unreadable)."""


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
SHUTTING_DOWN = "server shutting down: the drain grace (server.drain_grace_s) ran out; retry on another replica"


@dataclass
class Backend:
    """What the service needs once the model is loaded."""

    engine: Any  # AsyncEngine
    model_info: pb.ModelInfo
    telemetry: Telemetry


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    """Serves from `backend` once `attach`ed; until then (loading) every call answers UNAVAILABLE."""

    def __init__(self, state: ServingState, max_queued_requests: int):
        self.state = state
        self.max_queued_requests = max_queued_requests
        self.backend: Backend | None = None
        self.in_flight: set[str] = set()  # request ids this server is streaming now
        self.shutting_down = False  # set by `end_in_flight`: aborted streams then answer UNAVAILABLE

    def attach(self, backend: Backend) -> None:
        self.backend = backend

    async def _ready(self, context: grpc.aio.ServicerContext) -> Backend:
        if self.backend is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"server is {self.state.phase.value}; retry shortly")
        return self.backend

    # -- generation ---------------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        resp = pb.GenerateResponse()
        async with contextlib.aclosing(self._generate(request, context, "Generate")) as outputs:
            async for out in outputs:
                resp.request_id = out.request_id
                resp.token_ids.extend(out.new_token_ids)
                resp.logprobs.extend(logprobs_to_proto(out.logprobs))
                if out.finished:
                    resp.text = out.text
                    final = final_fields(out)
                    resp.finish_reason = final["finish_reason"]
                    resp.usage.CopyFrom(final["usage"])
                    resp.timings.CopyFrom(final["timings"])
        return resp

    async def GenerateStream(self, request: pb.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        # aclosing: when grpc drops this stream (cancel, deadline), the engine request is aborted now, not
        # whenever the garbage collector finalizes the inner generator.
        async with contextlib.aclosing(self._generate(request, context, "GenerateStream")) as outputs:
            async for out in outputs:
                yield chunk_to_proto(out)

    async def _generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext,
                        rpc: str) -> AsyncIterator[Any]:
        started = time.monotonic()
        call = RequestRecord("grpc", rpc, request.request_id)
        try:
            valid = await self._admit(request, context, call)
        except BaseException:
            call.finish(self.backend.telemetry if self.backend else None, started)
            raise
        engine, telemetry = self.backend.engine, self.backend.telemetry
        call.request_id = valid.request_id
        self.in_flight.add(valid.request_id)
        stream = engine.generate(valid.request_id, valid.prompt_token_ids, valid.params)
        try:
            async for out in stream:
                call.last = out
                if self.shutting_down and out.finish_reason == "abort":
                    call.status = "UNAVAILABLE"
                    await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
                yield out
        except (asyncio.CancelledError, GeneratorExit):
            call.status = "CANCELLED"  # client cancel or deadline: the engine request is aborted below
            raise
        except EngineDeadError as e:
            call.status = "UNAVAILABLE"
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"engine is down: {e}")
        except (RequestError, MissingTokenizerError) as e:  # the engine's checks of the request's fields
            code, message = status_of(e)
            call.status = code.name
            await context.abort(code, message)
        finally:
            self.in_flight.discard(valid.request_id)
            await stream.aclose()  # not finished: the engine aborts the request and frees its KV blocks
            call.finish(telemetry, started)

    async def _admit(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext,
                     call: RequestRecord) -> WireRequest:
        """Refuse or accept a request; aborts the call with the right status code when refusing. The engine
        checks the request's fields when the stream starts (`_generate`)."""
        code, message = None, ""
        b = self.backend
        if b is not None and b.engine.is_dead:
            code, message = grpc.StatusCode.UNAVAILABLE, f"engine is down: {b.engine.dead_error}"
        elif b is None or not self.state.accepting:
            code, message = grpc.StatusCode.UNAVAILABLE, f"server is {self.state.phase.value}; retry another replica"
        elif b.engine.num_waiting >= self.max_queued_requests:
            code, message = (grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"queue full: {b.engine.num_waiting} requests waiting "
                             f"(server.max_queued_requests={self.max_queued_requests}); retry later")
        if code is None:
            try:
                valid = await asyncio.to_thread(from_proto, request, b.engine.encode)  # tokenizes: off the loop
                if valid.request_id in self.in_flight:
                    raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT,
                                          f"request_id={valid.request_id!r}: already in flight; use a unique id "
                                          "or leave it empty")
                return valid
            except (RequestError, MissingTokenizerError) as e:
                code, message = status_of(e)
        call.status = code.name
        await context.abort(code, message)
        raise AssertionError("unreachable: context.abort raises")

    async def end_in_flight(self) -> None:
        """Abort every in-flight request in the engine; their streams end with UNAVAILABLE `SHUTTING_DOWN`
        (the drain grace ran out)."""
        self.shutting_down = True
        for request_id in list(self.in_flight):
            await self.backend.engine.abort(request_id)

    # -- control and introspection ------------------------------------------------------------------------
    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id='': give the id of the request")
        backend = await self._ready(context)
        found = request.request_id in self.in_flight
        if found:
            await backend.engine.abort(request.request_id)
        return pb.AbortResponse(aborted=found)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return (await self._ready(context)).model_info

    async def GetExpertStats(self, request: pb.GetExpertStatsRequest,
                             context: grpc.aio.ServicerContext) -> pb.ExpertStats:
        return snapshot_to_proto((await self._ready(context)).telemetry.snapshot())

    async def ApplyPlacement(self, request: pb.ApplyPlacementRequest,
                             context: grpc.aio.ServicerContext) -> pb.ApplyPlacementResponse:
        """`_apply_placement`, with one log line per call: accepted or rejected, by whom (the peer)."""
        from moe_runtime.cluster import placement_log  # no Ray: pure data

        before = self.backend.engine.placement if self.backend is not None else None
        try:
            resp = await self._apply_placement(request, context)
        except BaseException as e:
            code = context.code()
            placement_log.log_rejected(context.peer(), code.name if code is not None else type(e).__name__,
                                       context.details() or str(e))
            raise
        placement_log.log_accepted(context.peer(), before, self.backend.engine.placement, resp.seconds)
        return resp

    async def _apply_placement(self, request: pb.ApplyPlacementRequest,
                               context: grpc.aio.ServicerContext) -> pb.ApplyPlacementResponse:
        """Parse and check the placement here, then move experts on the step loop between two steps."""
        engine = (await self._ready(context)).engine
        if engine.placement is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "ApplyPlacement needs the Ray executor; this server runs executor: local (start "
                                "it with executor: ray and placement.workers, e.g. configs/tiny-ray-2-workers.yaml)")
        from moe_runtime.cluster.placement_config import placement_from_yaml_text  # no Ray: pure data

        cfg = engine.model_config
        started = time.monotonic()
        try:
            placement = placement_from_yaml_text(request.placement_yaml, cfg.num_hidden_layers,
                                                 cfg.num_local_experts, "placement_yaml")
            await engine.apply_placement(placement)
        except ConfigError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except UnsupportedError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except (EngineDeadError, TimeoutError) as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"moving experts failed: {e or 'timed out'}")
        self.backend.telemetry.set_rank_shares(placement.rank_shares())
        return pb.ApplyPlacementResponse(workers=placement.workers, expert_bytes=engine.expert_bytes(),
                                         seconds=time.monotonic() - started)


def build_server(servicer: GenerationServicer, cfg: ServerConfig, auth_token: str | None = None) -> tuple[
        grpc.aio.Server, int]:
    """A `grpc.aio.Server` with the service, health and reflection, bound to (cfg.host, cfg.port).

    Returns the server (not started) and the bound port (cfg.port=0 picks a free one).
    """
    options = [
        ("grpc.max_receive_message_length", cfg.max_request_bytes),  # larger: RESOURCE_EXHAUSTED, unread
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        ("grpc.so_reuseport", 0),  # two servers on one port is a mistake, not a load balancer
    ]
    credentials = server_credentials(cfg)  # before anything binds: a bad PEM is a config error
    # Auth first: a denied call is answered before its request is parsed; then undecodable requests.
    interceptors = [*([BearerTokenInterceptor(auth_token)] if auth_token else []), DecodeErrorInterceptor()]
    server = grpc.aio.server(options=options, interceptors=interceptors)
    pb_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    from grpc_health.v1 import health_pb2_grpc

    health_pb2_grpc.add_HealthServicer_to_server(servicer.state.health, server)
    enable_reflection(server, [SERVICE_NAME, "grpc.health.v1.Health"])
    address = f"{cfg.host}:{cfg.port}"
    port = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    return server, port
