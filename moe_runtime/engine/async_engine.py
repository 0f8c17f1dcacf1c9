"""`AsyncEngine`: one background thread steps the `LLMEngine`; each request streams through an asyncio queue.

Threads: the step loop thread owns the `LLMEngine` (scheduler, executor). The event loop thread only
validates requests (read-only), posts "add" and "abort" messages to an inbox that the step loop drains
between steps, and receives outputs via `call_soon_threadsafe`. So no lock is held around a step, and an
abort frees the request's KV blocks before the next step is scheduled.

If a step raises, the loop dies: `dead_error` is set, every open stream raises `EngineDeadError`, and so
does every later `generate` call. Except when the step raises `EngineDeadError` (the executor lost a Ray
worker) and the executor can restart: then every open stream raises that error, `is_recovering` is True
(new requests are refused with `EngineDeadError`) while `LLMEngine.recover` rebuilds the workers, and the
loop goes on serving.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from moe_runtime.config import ModelConfig
from moe_runtime.engine.llm_engine import LLMEngine
from moe_runtime.engine.outputs import EngineStats, RequestOutput
from moe_runtime.engine.sampling_params import SamplingParams
from moe_runtime.errors import EngineDeadError, MoeRuntimeError, RequestError
from moe_runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Seconds between health checks of an idle executor (Ray workers), so a dead worker is found and replaced
# before the next request needs it.
IDLE_HEALTH_CHECK_S = 2.0


def _resolve(future: asyncio.Future, result, error: BaseException | None) -> None:
    if not future.done():  # the caller may have gone (cancelled)
        future.set_exception(error) if error is not None else future.set_result(result)


class AsyncEngine:
    """on_step: called on the step-loop thread with every stats snapshot the loop takes (after each step and
    after applying adds and aborts); telemetry's hook. An exception in it is logged, never fatal."""

    def __init__(self, engine: LLMEngine, on_step: Callable[[EngineStats], None] | None = None):
        self.engine = engine
        self._on_step = on_step
        self.dead_error: EngineDeadError | None = None
        self.recovering_error: EngineDeadError | None = None  # set while the executor restarts
        self._streams: dict[str, asyncio.Queue] = {}  # request id -> its outputs (event loop thread only)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", Request) | ("abort", id) | ("call", fn, future)
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stats: EngineStats  # replaced (never mutated) by the step loop
        self._take_stats()

    # ------------------------------------------------------------------------------------------------------
    # Life cycle
    # ------------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="moe-runtime-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Stop the loop after the current step; open streams raise `EngineDeadError`. Idempotent."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self.dead_error is None:
            self.dead_error = EngineDeadError("the engine is shut down")
        self._fail_all(self.dead_error)
        self.engine.shutdown()

    @property
    def is_dead(self) -> bool:
        return self.dead_error is not None

    @property
    def is_recovering(self) -> bool:
        return self.recovering_error is not None

    @property
    def num_waiting(self) -> int:
        return self._stats.num_waiting + self._inbox.qsize()

    def make_stats(self) -> EngineStats:
        """The snapshot taken after the latest step (or abort): a plain dataclass, safe to read anywhere."""
        return self._stats

    @property
    def model_config(self) -> ModelConfig:
        return self.engine.model_config

    @property
    def placement(self) -> Any:
        """Which worker holds which experts (the cluster's `Placement`), None in one process."""
        return self.engine.executor.placement

    def expert_bytes(self) -> list[int]:
        """Bytes of expert weights each worker holds (`UnsupportedError` in one process)."""
        return self.engine.executor.expert_bytes()

    async def apply_placement(self, placement: Any) -> None:
        """Move experts to follow `placement` on the step loop, between two steps (in-flight requests wait,
        then go on with the same outputs). `UnsupportedError` in one process; `TimeoutError` past the
        executor's `placement_timeout_s`; `ConfigError` for a placement that does not fit."""
        executor = self.engine.executor
        await asyncio.wait_for(self.run_between_steps(lambda: executor.apply_placement(placement)),
                               None if math.isinf(executor.placement_timeout_s) else executor.placement_timeout_s)

    @property
    def tokenizer(self) -> Tokenizer | None:
        """The checkpoint's tokenizer (None: token ids only). Read-only after start, safe from any thread."""
        return self.engine.tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a text prompt (`LLMEngine.encode`); `MissingTokenizerError` when the checkpoint has no
        tokenizer."""
        return self.engine.encode(text, add_special_tokens)

    # ------------------------------------------------------------------------------------------------------
    # Requests
    # ------------------------------------------------------------------------------------------------------
    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (deltas) until one has `finished`. Leaving early aborts the request."""
        if self.dead_error is not None:
            raise self.dead_error
        if self.recovering_error is not None:
            raise EngineDeadError(f"the executor is restarting after a failure ({self.recovering_error}); retry shortly")
        if self._thread is None:
            raise EngineDeadError("the engine is not started; call `await engine.start()` first")
        if request_id in self._streams:
            raise RequestError(f"request_id={request_id!r}: already in flight; ids must be unique")
        request = self.engine.make_request(request_id, list(prompt_token_ids), params)  # validated once, here
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._post(("add", request))
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if self._streams.get(request_id) is stream:
                del self._streams[request_id]
            if not finished and self.dead_error is None:
                self._post(("abort", request_id))  # cancelled or abandoned: free its blocks

    async def run_between_steps(self, fn):
        """Run `fn()` on the step loop thread between two steps (e.g. moving experts); returns its result
        or raises its error. In-flight requests wait for it, and go on after."""
        if self.dead_error is not None:
            raise self.dead_error
        done = asyncio.get_running_loop().create_future()
        self._post(("call", fn, done))
        return await done

    async def abort(self, request_id: str) -> None:
        """Abort a request; its stream ends with `finish_reason="abort"`. Unknown ids are ignored."""
        if self.dead_error is None:
            self._post(("abort", request_id))

    # ------------------------------------------------------------------------------------------------------
    # The step loop (background thread)
    # ------------------------------------------------------------------------------------------------------
    def _post(self, message: tuple) -> None:
        self._inbox.put(message)
        self._wake.set()

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._wake.clear()
                if self._drain_inbox():
                    self._take_stats()
                if not self.engine.has_unfinished():
                    if not self._wake.wait(IDLE_HEALTH_CHECK_S):
                        self._check_health()
                    continue
                try:
                    outputs = self.engine.step()
                except EngineDeadError as e:  # a lost worker: fail what is in flight, rebuild, serve on
                    self._recover(e)
                    continue
                self._take_stats()
                if outputs:
                    self._send(self._deliver, outputs)
        except BaseException as e:  # noqa: BLE001 - any failure kills the loop, and every stream hears of it
            err = EngineDeadError(f"the engine step loop died: {type(e).__name__}: {e}")
            err.__cause__ = e
            self.dead_error = err
            self._send(self._fail_all, err)

    def _take_stats(self) -> None:
        """Snapshot the engine's stats for readers on other threads, and hand it to the `on_step` hook."""
        self._stats = self.engine.make_stats()
        if self._on_step is not None:
            try:
                self._on_step(self._stats)
            except Exception:  # telemetry must never kill the step loop
                log.exception("the on_step hook failed on the engine stats")

    def _check_health(self) -> None:
        try:
            self.engine.executor.check_health()
        except EngineDeadError as e:
            self._recover(e)

    def _recover(self, error: EngineDeadError) -> None:
        """Fail every open stream and queued add with `error`, then `LLMEngine.recover` (drop all requests,
        restart the executor). Raises, killing the loop, when the engine cannot recover."""
        self.recovering_error = error
        lost = EngineDeadError(f"{error}; this request is lost and the executor is restarting: retry shortly")
        self._send(self._fail_all, lost)
        self._drain_inbox(fail_adds=lost)
        self.engine.recover(error)
        self._take_stats()
        self.recovering_error = None

    def _drain_inbox(self, fail_adds: EngineDeadError | None = None) -> bool:
        """Apply queued adds and aborts in order (adds fail with `fail_adds` when given). Returns whether
        there were any."""
        drained = False
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return drained
            drained = True
            if message[0] == "call":
                _, fn, done = message
                try:
                    self._send(_resolve, done, fn(), None)
                except Exception as e:  # noqa: BLE001 - the caller gets the error
                    self._send(_resolve, done, None, e)
                continue
            if message[0] == "add":
                request = message[1]
                if fail_adds is not None:
                    self._send(self._deliver_error, request.request_id, fail_adds)
                    continue
                try:
                    self.engine.add(request)
                except MoeRuntimeError as e:  # e.g. the same id reused before its abort was applied
                    self._send(self._deliver_error, request.request_id, e)
            else:
                out = self.engine.abort(message[1])
                if out is not None:
                    self._send(self._deliver, [out])

    def _send(self, callback, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    # ------------------------------------------------------------------------------------------------------
    # Event loop side
    # ------------------------------------------------------------------------------------------------------
    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)

    def _deliver_error(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(error)

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.put_nowait(error)
