"""Runs one scheduled step on the model: flatten the batch, forward, logits of the last rows, sample.

The runner keeps each running request's tokens and block table between steps (the scheduler sends only the
diff) and appends the tokens it samples itself, so the next step needs no token ids from the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_runtime.engine.sampler import Sampler
from moe_runtime.engine.sampling_params import SamplingParams
from moe_runtime.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from moe_runtime.model.attention import AttentionMetadata, KVCache
from moe_runtime.model.mixtral import MixtralForCausalLM

# B scheduled requests, T flat tokens, N requests that sample this step


@dataclass
class _RequestState:
    token_ids: list[int]  # prompt + generated, as the scheduler knows them
    block_ids: list[int]  # KV block table, in token order
    params: SamplingParams


@dataclass
class _StepInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    sample_rows: list[int]  # row of each sampling request's last token in the flat batch, [N]
    sample_ids: list[str]  # those requests, [N]


class ModelRunner:
    def __init__(self, model: MixtralForCausalLM, kv_caches: list[KVCache], block_size: int, sampler: Sampler):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sampler = sampler
        self.device = model.device
        self._states: dict[str, _RequestState] = {}

    @property
    def num_requests(self) -> int:
        """Requests whose state the runner holds (tests check that finished ones are dropped)."""
        return len(self._states)

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(sched)
        if sched.is_empty:
            return ModelRunnerOutput([], [], [], None)
        inp = self._prepare(sched)
        hidden = self.model(inp.input_ids, inp.positions, inp.meta, self.kv_caches)  # [T, D]
        router_counts = self.model.take_router_counts()  # [L, E]
        if not inp.sample_rows:
            return ModelRunnerOutput([], [], [], router_counts)
        logits = self.model.compute_logits(hidden[inp.sample_rows])  # [N, V] fp32
        states = [self._states[rid] for rid in inp.sample_ids]
        tokens, logprobs = self.sampler(logits, [s.params for s in states], [len(s.token_ids) for s in states])
        for state, token in zip(states, tokens, strict=True):
            state.token_ids.append(token)
        return ModelRunnerOutput(inp.sample_ids, tokens, logprobs, router_counts)

    def _update_states(self, sched: SchedulerOutput) -> None:
        for rid in sched.finished_request_ids:  # before new ones: a resumed request comes back as new
            self._states.pop(rid, None)
        for new in sched.new_requests:
            self._states[new.request_id] = _RequestState(list(new.token_ids), list(new.block_ids), new.params)
        for cached in sched.cached_requests:
            self._states[cached.request_id].block_ids.extend(cached.new_block_ids)

    def _prepare(self, sched: SchedulerOutput) -> _StepInputs:
        """Flatten the scheduled tokens of every request into one batch with its KV slots."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl, context_lens, tables = [0], [], []
        sample_rows, sample_ids = [], []
        for rid, n in sched.num_scheduled_tokens.items():
            state = self._states[rid]
            start = sched.num_computed_tokens[rid]
            end = start + n
            input_ids.extend(state.token_ids[start:end])
            positions.extend(range(start, end))
            table = state.block_ids
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            qsl.append(qsl[-1] + n)
            context_lens.append(end)
            tables.append(table)
            if end == len(state.token_ids):  # computed up to its last token: sample the next one
                sample_rows.append(qsl[-1] - 1)
                sample_ids.append(rid)
        width = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)  # [B, W]
        dev = self.device
        meta = AttentionMetadata(
            query_start_loc=qsl,
            context_lens=context_lens,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=block_tables.to(dev),
        )
        return _StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            meta=meta,
            sample_rows=sample_rows,
            sample_ids=sample_ids,
        )
