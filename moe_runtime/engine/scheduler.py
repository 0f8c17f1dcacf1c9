"""FCFS continuous batching over a paged KV cache: which tokens of which requests run in each step.

The loop calls `add` for new requests, then each step `schedule()` -> executor -> `update_from_output()`;
`abort` may come at any time between steps.
"""

from __future__ import annotations

import time
from collections import deque

from moe_runtime.config import EngineConfig
from moe_runtime.engine.block_manager import BlockManager
from moe_runtime.engine.outputs import EngineStats, RequestOutput
from moe_runtime.engine.prefill_chunk import resolve_prefill_chunk
from moe_runtime.engine.request import Request, RequestStatus
from moe_runtime.engine.scheduler_output import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from moe_runtime.errors import RequestError


class Scheduler:
    """prefill_chunk: prompt tokens per step, all requests together (`engine.prefill_chunk` resolved by
    engine/prefill_chunk.py `resolve_prefill_chunk`, which the engine calls with its executor's measurement);
    None: resolved without one (the configured int, else `max_num_batched_tokens`)."""

    def __init__(self, cfg: EngineConfig, block_manager: BlockManager, num_spec_tokens: int = 0,
                 prefill_chunk: int | None = None):
        self.max_num_seqs = cfg.max_num_seqs
        self.max_num_batched_tokens = cfg.max_num_batched_tokens
        self.prefill_chunk = resolve_prefill_chunk(cfg, None) if prefill_chunk is None else prefill_chunk
        assert 0 < self.prefill_chunk <= self.max_num_batched_tokens, (self.prefill_chunk, cfg)
        self.block_manager = block_manager
        self.num_spec_tokens = num_spec_tokens  # k of speculative decoding; 0: off
        self.requests: dict[str, Request] = {}  # every unfinished request, waiting or running
        self.waiting: deque[Request] = deque()  # FCFS; preempted requests go back to the front
        self.running: list[Request] = []  # in admission order: the newest is preempted first
        self._worker_known: set[str] = set()  # requests whose tokens and blocks the workers hold
        self._dropped: set[str] = set()  # to tell the workers at the next step: drop these
        self.num_preemptions = 0
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0
        self.step_num_tokens = 0
        self.num_spec_proposed = 0  # proposed tokens verified, since start
        self.num_spec_accepted = 0  # of those, accepted
        self.num_spec_verified = 0  # request-steps that verified at least one proposal

    def add(self, request: Request) -> None:
        """Queue a validated request. A duplicate id of an unfinished request is a `RequestError`."""
        if request.request_id in self.requests:
            raise RequestError(f"request_id={request.request_id!r}: already in flight; ids must be unique")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        """Grant tokens to running requests, then admit waiting ones, within the token and block budgets."""
        # NOTE(engine) on the algorithm: there is no prefill or decode phase. Each request owes
        # `num_tokens - num_computed_tokens` tokens (a whole prompt, one prompt chunk, the last sampled token,
        # or everything again after preemption); a step grants each one up to what the budget allows.
        # Requests owing more than one token (prompt chunks) share `prefill_chunk` of it: a step's length, and
        # so every running request's wait for its next token, stays bounded while long prompts arrive.
        budget = self.max_num_batched_tokens
        prompt_budget = self.prefill_chunk
        scheduled: dict[str, int] = {}
        spec: dict[str, int] = {}
        new_blocks: dict[str, list[int]] = {}
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._grant(req.num_tokens_owed, budget, prompt_budget)
            if n == 0:  # mid-prompt, and this step's prompt tokens are spent: decodes after it still run
                i += 1
                continue
            k = self._spec_budget(req, budget)
            if k:
                spec[req.request_id] = k
                n += k  # room for k proposals in the budget and the KV cache; verified with the token owed
            while not self.block_manager.can_allocate(req.request_id, req.num_computed_tokens + n):
                if k:  # speculation never preempts: drop it first
                    n, k = n - k, 0
                    del spec[req.request_id]
                    continue
                victim = self.running.pop()  # newest first; `req` itself is the last resort
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                break  # preempted itself, so it was the newest running request
            new_blocks[req.request_id] = self.block_manager.allocate(req.request_id, req.num_computed_tokens + n)
            scheduled[req.request_id] = n - k
            budget -= n
            prompt_budget -= n if req.num_tokens_owed > 1 else 0
            i += 1
        # Admit waiting requests in order, unless this step had to preempt (the cache is full). A request
        # starts after the longest prefix of full blocks the cache already holds (none without prefix caching).
        now = time.monotonic()
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            req = self.waiting[0]
            cached = bm.match_prefix(req.token_ids)
            done = len(cached) * bm.block_size  # tokens whose KV the cache holds
            room = bm.num_free_besides(cached) * bm.block_size  # new tokens that fit
            n = min(self._grant(req.num_tokens - done, budget, prompt_budget), room)
            if n == 0:
                break
            self.waiting.popleft()
            bm.adopt(req.request_id, cached, req.num_tokens)
            req.num_computed_tokens = done
            new_blocks[req.request_id] = cached + bm.allocate(req.request_id, done + n)
            req.status = RequestStatus.RUNNING
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
            self.running.append(req)
            scheduled[req.request_id] = n
            budget -= n
            prompt_budget -= n if req.num_tokens - done > 1 else 0
        return self._make_output(scheduled, new_blocks, spec)

    @staticmethod
    def _grant(owed: int, budget: int, prompt_budget: int) -> int:
        """Tokens for a request owing `owed`: all it owes within the step's budget, and a prompt chunk (more
        than one token owed) no more than what is left of the step's prompt budget."""
        return min(owed, budget) if owed == 1 else min(owed, budget, prompt_budget)

    def _spec_budget(self, req: Request, budget: int) -> int:
        """Proposals a running request may have verified this step: none mid-prompt, and never past its
        max_tokens or the context (all k accepted plus one more token must still fit)."""
        if not self.num_spec_tokens or req.num_tokens_owed != 1:
            return 0
        return max(0, min(self.num_spec_tokens, budget - 1, req.max_num_tokens - req.num_tokens))

    def _make_output(self, scheduled: dict[str, int], new_blocks: dict[str, list[int]],
                     spec: dict[str, int]) -> SchedulerOutput:
        new, cached = [], []
        for rid in scheduled:
            req = self.requests[rid]
            if rid in self._worker_known:
                cached.append(CachedRequestData(rid, new_blocks[rid]))
            else:
                table = list(self.block_manager.table(rid))
                new.append(NewRequestData(rid, list(req.token_ids), table, req.params))
                self._worker_known.add(rid)
        dropped, self._dropped = self._dropped, set()
        computed = {rid: self.requests[rid].num_computed_tokens for rid in scheduled}
        return SchedulerOutput(scheduled, computed, new, cached, dropped, spec)

    def update_from_output(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[RequestOutput]:
        """Advance computed tokens, append sampled ones, finish requests that stop; return their outputs."""
        now = time.monotonic()
        self.step_num_tokens = sched.total_num_scheduled_tokens
        bm = self.block_manager
        sampled = set(result.request_ids)
        for rid, n in sched.num_scheduled_tokens.items():
            req = self.requests.get(rid)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue  # aborted since it was scheduled
            self.num_prompt_tokens += max(0, min(n, req.num_prompt_tokens - req.num_computed_tokens))
            req.num_computed_tokens += n
            if rid not in sampled:  # a prompt chunk: its full blocks are final now
                bm.cache_full_blocks(rid, req.token_ids, req.num_computed_tokens)
        outputs = []
        for i, (rid, tokens) in enumerate(zip(result.request_ids, result.sampled_token_ids, strict=True)):
            req = self.requests.get(rid)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue
            if result.num_proposed and result.num_proposed[i]:
                self.num_spec_verified += 1
                self.num_spec_proposed += result.num_proposed[i]
                self.num_spec_accepted += len(tokens) - 1
            logprobs = result.logprobs[i]
            for j, token_id in enumerate(tokens):
                if j:  # an accepted proposal before it: that one's KV was computed in this step's forward
                    req.num_computed_tokens += 1
                self.num_generated_tokens += 1
                req.append_token(token_id, None if logprobs is None else logprobs[j], now)
                if req.finished:
                    break
            bm.cache_full_blocks(rid, req.token_ids, req.num_computed_tokens)
            if req.finished:
                self._release(req)
                self.running.remove(req)
            outputs.append(req.make_output())
        return outputs

    def abort(self, request_id: str) -> Request | None:
        """Finish a request now and free its KV blocks. Returns it, or None if it is not in flight."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        req.finish("abort")
        self._release(req)
        return req

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def make_stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_blocks_total=bm.num_blocks,
            kv_blocks_used=bm.num_used,
            kv_blocks_free=bm.num_free,
            num_preemptions=self.num_preemptions,
            steps=0,  # the engine counts steps
            num_prompt_tokens=self.num_prompt_tokens,
            num_generated_tokens=self.num_generated_tokens,
            step_num_tokens=self.step_num_tokens,
            prefix_cache_queries=bm.queries,
            prefix_cache_hits=bm.hits,
            spec_proposed_tokens=self.num_spec_proposed,
            spec_accepted_tokens=self.num_spec_accepted,
            spec_verifications=self.num_spec_verified,
        )

    def _preempt(self, req: Request) -> None:
        """Recompute later: drop its KV blocks and put it back at the front of the queue."""
        self.block_manager.free(req.request_id)
        self._forget(req.request_id)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def _release(self, req: Request) -> None:
        self.block_manager.free(req.request_id)
        self._forget(req.request_id)
        del self.requests[req.request_id]

    def _forget(self, request_id: str) -> None:
        if request_id in self._worker_known:
            self._worker_known.discard(request_id)
            self._dropped.add(request_id)
