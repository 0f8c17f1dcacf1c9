"""Runs one scheduled step on the model: flatten the batch, forward, logits of the last rows, sample.

The runner keeps each running request's tokens and block table between steps (the scheduler sends only the
diff) and appends the tokens it samples itself, so the next step needs no token ids from the scheduler.
How the model runs (eagerly, from CUDA graphs, as native CPU decode steps) is the `StepForward` it was
built with (engine/parts.py). On CUDA a step's index inputs reach the device in one copy from pinned
memory, and its results (sampled tokens, router counts) come back in one copy: the step never waits on the
GPU before sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_runtime.engine.forward import StepForward, StepInputs
from moe_runtime.engine.sampler import Sampler
from moe_runtime.engine.sampling_params import SamplingParams
from moe_runtime.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from moe_runtime.kernels.attention import AttentionMetadata, KVCache
from moe_runtime.kernels.attention_reference import PagedBatch
from moe_runtime.model.mixtral import MixtralForCausalLM

# B scheduled requests, T flat tokens, N requests that sample this step, W block-table width


@dataclass
class _RequestState:
    token_ids: list[int]  # prompt + generated, as the scheduler knows them
    block_ids: list[int]  # KV block table, in token order
    params: SamplingParams


@dataclass
class _HostBatch:
    """A step's flat batch as host lists, before it goes to the device."""

    input_ids: list[int]  # [T]
    positions: list[int]  # [T]
    slots: list[int]  # [T] KV slot of each token
    query_start_loc: list[int]  # [B + 1]
    context_lens: list[int]  # [B]
    tables: list[list[int]]  # B block tables, ragged
    sample_rows: list[int]  # [N] row of each sampling request's last token
    sample_ids: list[str]  # [N] those requests


class ModelRunner:
    def __init__(self, model: MixtralForCausalLM, kv_caches: list[KVCache], block_size: int, sampler: Sampler,
                 forward: StepForward):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sampler = sampler
        self.forward = forward
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
        host = self._flatten(sched)
        inputs, sample_rows = self._to_device(host)
        hidden, router_counts = self.forward(inputs)  # [T, D], [L, E]
        if not host.sample_rows:
            return ModelRunnerOutput([], [], [], router_counts.cpu())
        logits = self.model.compute_logits(hidden[sample_rows])  # [N, V] fp32
        states = [self._states[rid] for rid in host.sample_ids]
        sampled = self.sampler(logits, [s.params for s in states], [len(s.token_ids) for s in states])
        tokens, logprobs, router_counts = sampled.to_host_with(router_counts)  # the step's one device-to-host copy
        for state, token in zip(states, tokens, strict=True):
            state.token_ids.append(token)
        return ModelRunnerOutput(host.sample_ids, tokens, logprobs, router_counts.cpu())

    def _update_states(self, sched: SchedulerOutput) -> None:
        for rid in sched.finished_request_ids:  # before new ones: a resumed request comes back as new
            self._states.pop(rid, None)
        for new in sched.new_requests:
            self._states[new.request_id] = _RequestState(list(new.token_ids), list(new.block_ids), new.params)
        for cached in sched.cached_requests:
            self._states[cached.request_id].block_ids.extend(cached.new_block_ids)

    def _flatten(self, sched: SchedulerOutput) -> _HostBatch:
        """The scheduled tokens of every request in one flat batch, with their KV slots."""
        bs = self.block_size
        b = _HostBatch([], [], [], [0], [], [], [], [])
        for rid, n in sched.num_scheduled_tokens.items():
            state = self._states[rid]
            start = sched.num_computed_tokens[rid]
            end = start + n
            b.input_ids.extend(state.token_ids[start:end])
            b.positions.extend(range(start, end))
            table = state.block_ids
            b.slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            b.query_start_loc.append(b.query_start_loc[-1] + n)
            b.context_lens.append(end)
            b.tables.append(table)
            if end == len(state.token_ids):  # computed up to its last token: sample the next one
                b.sample_rows.append(b.query_start_loc[-1] - 1)
                b.sample_ids.append(rid)
        return b

    def _to_device(self, b: _HostBatch) -> tuple[StepInputs, torch.Tensor]:
        """The batch's tensors on the model's device: int32 from one pinned buffer in one copy on CUDA
        (with the triton kernels' `PagedBatch` as views of it), int64 built in place on CPU. Also returns
        the sample rows [N] on the device."""
        T, B = len(b.input_ids), len(b.context_lens)
        W = max(len(t) for t in b.tables)
        padded = [x for t in b.tables for x in (*t, *[0] * (W - len(t)))]  # [B * W]
        parts = (b.input_ids, b.positions, b.slots, b.query_start_loc, b.context_lens, b.sample_rows, padded)
        if self.device.type == "cuda":
            staged = torch.tensor([x for p in parts for x in p], dtype=torch.int32, pin_memory=True)
            flat = staged.to(self.device, non_blocking=True)
        else:
            flat = torch.tensor([x for p in parts for x in p], dtype=torch.long)
        ids, pos, slots, qsl, ctx, rows, tables = flat.split([len(p) for p in parts])
        tables = tables.view(B, W)
        paged = PagedBatch(tables, ctx, qsl, max(b.query_start_loc[i + 1] - b.query_start_loc[i] for i in range(B)))
        meta = AttentionMetadata(
            query_start_loc=b.query_start_loc,
            context_lens=b.context_lens,
            slot_mapping=slots,
            block_tables=tables,
            paged_batch=paged if self.device.type == "cuda" else None,
        )
        decode = T == B and all(c > 1 for c in b.context_lens)
        return StepInputs(ids, pos, meta, decode), rows
