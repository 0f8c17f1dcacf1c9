"""The synchronous engine: add requests, step, collect outputs. `AsyncEngine` drives it from a thread."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

from moe_runtime.config import RuntimeConfig
from moe_runtime.engine.block_manager import BlockManager
from moe_runtime.engine.detokenizer import IncrementalDetokenizer
from moe_runtime.engine.executor import Executor, LocalExecutor
from moe_runtime.engine.outputs import EngineStats, RequestOutput
from moe_runtime.engine.prefill_chunk import resolve_prefill_chunk
from moe_runtime.engine.request import Request
from moe_runtime.engine.sampling_params import SamplingParams, validate_prompt
from moe_runtime.engine.scheduler import Scheduler
from moe_runtime.errors import CapacityError, ConfigError, RequestError
from moe_runtime.tokenizer import load_tokenizer, require_tokenizer


class LLMEngine:
    """executor: where the model runs, built where the process is assembled (`moe_runtime.launch`); None
    builds a `LocalExecutor` (`executor: local` only)."""

    def __init__(self, cfg: RuntimeConfig, executor: Executor | None = None, progress: bool = False):
        if cfg.model.path is None:
            raise ConfigError("model.path=None: the engine needs a checkpoint directory (see ensure_default_model)")
        if executor is None and cfg.executor != "local":
            raise ConfigError(f"executor={cfg.executor!r}: build the engine with moe_runtime.launch.build_engine, "
                              "which makes that executor; LLMEngine alone makes the local one")
        self.config = cfg
        self.executor = executor if executor is not None else LocalExecutor(cfg, cfg.model.path, progress)
        self.model_config = self.executor.model_config
        self.tokenizer = load_tokenizer(cfg.model.path)  # None: token ids only
        self.max_model_len = cfg.engine.max_model_len or self.model_config.max_position_embeddings
        tokenizer_eos = None if self.tokenizer is None else self.tokenizer.eos_token_id
        self.eos_token_ids = self.model_config.eos_token_ids or (() if tokenizer_eos is None else (tokenizer_eos,))
        blocks = BlockManager(self.executor.num_kv_blocks, cfg.cache.block_size, cfg.cache.prefix_caching)
        spec = cfg.speculative
        chunk = resolve_prefill_chunk(cfg.engine, self.executor.measured_prefill_chunk)
        self.scheduler = Scheduler(cfg.engine, blocks, 0 if spec.method == "none" else spec.num_tokens, chunk)
        self.num_steps = 0
        self._num_generate_calls = 0  # ids of `generate` requests: generate-<call>-<index>
        self._last_step_s = 0.0
        self._last_router_counts = None

    # ------------------------------------------------------------------------------------------------------
    # Requests
    # ------------------------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a text prompt (with BOS unless `add_special_tokens` is False: a rendered chat template
        writes its own); `MissingTokenizerError` for a checkpoint without one.

        Refuses (`RequestError` on `prompt`) empty text, text that tokenizes to no tokens, and text longer in
        UTF-8 than `max_model_len - 1` tokens of the tokenizer's longest could cover, which can never fit:
        that check comes before tokenizing, so a 4 MB prompt costs microseconds, not seconds. Tokenizing
        releases the GIL: callers on an event loop run this in a thread. Safe from any thread.
        """
        tokenizer = require_tokenizer(self.tokenizer, self.config.model.path, "prompt")
        if not text:
            raise RequestError("prompt='': empty; send text or token ids", "prompt")
        try:
            size = len(text.encode())
        except UnicodeEncodeError as e:  # lone surrogates, e.g. from a command line that was not UTF-8
            raise RequestError(f"prompt: not valid Unicode ({e.reason} at character {e.start}); allowed: "
                               "UTF-8 text", "prompt") from None
        per_token = tokenizer.max_token_bytes  # None: this tokenizer has no such bound
        limit = None if per_token is None else (self.max_model_len - 1) * per_token
        if limit is not None and size > limit:
            raise RequestError(
                f"prompt=<{size} bytes of text>: longer than the context; allowed: at most {limit} bytes "
                f"({self.max_model_len - 1} tokens of at most {per_token} bytes each)", "prompt")
        ids = tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise RequestError(f"prompt=<{len(text)} characters>: tokenizes to no tokens; send other text", "prompt")
        return tokenizer.with_special_tokens(ids) if add_special_tokens else ids

    def make_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None) -> Request:
        """A validated request, not queued yet: the one place requests are checked (`RequestError` naming the
        field; `CapacityError` when the KV cache can never hold it). `prompt` is text (tokenized with BOS) or
        token ids. Reads only what never changes after start: safe from any thread."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params={type(params).__name__}: expected SamplingParams", "params")
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        validate_prompt(ids, self.model_config.vocab_size, self.max_model_len)
        params = params.resolved(self.max_model_len, len(ids))
        params.validate(self.max_model_len, self.model_config.vocab_size, len(ids))
        if params.stop:
            require_tokenizer(self.tokenizer, self.config.model.path, "stop")
        self._check_capacity(len(ids), params.max_tokens)
        detok = None if self.tokenizer is None else IncrementalDetokenizer(self.tokenizer.backend, params.stop)
        return Request(request_id, ids, params, self.eos_token_ids, detok, self.max_model_len)

    def _check_capacity(self, prompt_len: int, max_tokens: int) -> None:
        bm = self.scheduler.block_manager
        needed = bm.blocks_needed(prompt_len + max_tokens - 1)  # the last sampled token is never cached
        if needed > bm.num_blocks:
            raise CapacityError(
                f"prompt_token_ids: {prompt_len} prompt tokens + max_tokens={max_tokens} need {needed} KV blocks "
                f"but the cache holds {bm.num_blocks}: cannot fit in the KV cache ({bm.num_blocks * bm.block_size} "
                f"tokens in all); allowed: prompt + max_tokens <= {bm.num_blocks * bm.block_size + 1} (send less "
                "or raise cache.num_blocks or cache.memory_bytes)",
                "prompt_token_ids",
            )

    def add(self, request: Request) -> None:
        """Queue a request from `make_request`. A duplicate id of an unfinished one is a `RequestError`."""
        self.scheduler.add(request)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None) -> None:
        """Validate and queue a request (`make_request`, then `add`)."""
        self.add(self.make_request(request_id, prompt, params))

    def abort(self, request_id: str) -> RequestOutput | None:
        """Finish the request now and free its KV blocks; returns its final output (None if unknown)."""
        req = self.scheduler.abort(request_id)
        return None if req is None else req.make_output()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ------------------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One iteration: schedule -> execute -> update. Returns an output for every request that advanced."""
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        result = self.executor.execute(sched)
        outputs = self.scheduler.update_from_output(sched, result)
        self._last_step_s = time.perf_counter() - t0
        self._last_router_counts = result.router_counts
        self.num_steps += 1
        return outputs

    def generate(
        self,
        prompts: Sequence[str | list[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run a batch of prompts to completion together; returns each one's final output, in order.

        The final outputs hold everything (all token ids, text and logprobs), not just the last delta.
        """
        per_prompt = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise RequestError(f"params: {len(per_prompt)} given for {len(prompts)} prompts; give one or one each")
        self._num_generate_calls += 1
        ids = [f"generate-{self._num_generate_calls}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, per_prompt, strict=True):
            self.add_request(rid, prompt, p)
        final: dict[str, RequestOutput] = {}
        logprobs: dict[str, list] = {rid: [] for rid in ids}  # outputs carry deltas; gather them
        while self.has_unfinished():
            for out in self.step():
                if out.logprobs is not None and out.request_id in logprobs:
                    logprobs[out.request_id].extend(out.logprobs)
                if out.finished:
                    final[out.request_id] = out
        return [dataclasses.replace(final[rid], new_token_ids=final[rid].token_ids, new_text=final[rid].text,
                                    logprobs=None if final[rid].logprobs is None else logprobs[rid])
                for rid in ids]

    def recover(self, error: BaseException) -> None:
        """After a step failed with `error` because the executor lost a worker: drop every request (their
        state on the workers is gone; the caller has failed them) and restart the executor. Raises `error`
        when the executor cannot restart (`Executor.can_restart`)."""
        if not self.executor.can_restart:
            raise error
        for req in [*self.scheduler.running, *self.scheduler.waiting]:
            self.scheduler.abort(req.request_id)
        self.executor.restart()

    def make_stats(self) -> EngineStats:
        return dataclasses.replace(
            self.scheduler.make_stats(),
            steps=self.num_steps,
            step_latency_s=self._last_step_s,
            router_counts=self._last_router_counts,
            offload=self.executor.offload_stats(),
        )

    def shutdown(self) -> None:
        self.executor.shutdown()
