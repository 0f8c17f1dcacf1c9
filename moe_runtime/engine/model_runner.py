"""Runs one scheduled step on the model: flatten the batch, forward, logits of the last rows, sample.

The runner keeps each running request's tokens and block table between steps (the scheduler sends only the
diff) and appends the tokens it samples itself, so the next step needs no token ids from the scheduler.
How the model runs (eagerly, from CUDA graphs, as native CPU decode steps) is the `StepForward` it was
built with (engine/parts.py). On CUDA a step's index inputs reach the device in one copy from pinned
memory, and its results (sampled tokens, router counts) come back in one copy: the step never waits on the
GPU before sampling.

Speculative decoding (a `Proposer`, engine/spec/): a request the scheduler gave a budget of k tokens gets
up to k proposed tokens appended to its scheduled token in the same forward; the logits of all those rows
are verified at once (`Sampler.verify`), and the request gains the accepted proposals plus one token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_runtime.engine.batch import HostBatch
from moe_runtime.engine.forward import StepForward
from moe_runtime.engine.sampler import Sampler
from moe_runtime.engine.sampling_params import SamplingParams
from moe_runtime.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from moe_runtime.engine.spec.proposer import ProposalRequest, Proposer
from moe_runtime.kernels.attention import KVCache
from moe_runtime.model.causal_lm import CausalLM

# B scheduled requests, T flat tokens, N sample rows (a request's last token, plus its proposals)


@dataclass
class _RequestState:
    token_ids: list[int]  # prompt + generated, as the scheduler knows them
    block_ids: list[int]  # KV block table, in token order
    params: SamplingParams


class ModelRunner:
    def __init__(self, model: CausalLM, kv_caches: list[KVCache], block_size: int, sampler: Sampler,
                 forward: StepForward, proposer: Proposer | None = None):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sampler = sampler
        self.forward = forward
        self.proposer = proposer  # None: no speculative decoding
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
        drafts = self._propose(sched)
        host, sample_ids, proposed = self._flatten(sched, drafts)
        inputs, sample_rows = host.to_device(self.device)
        hidden, router_counts = self.forward(inputs)  # [T, D], [L, E]
        if not sample_ids:
            return ModelRunnerOutput([], [], [], router_counts.cpu())
        logits = self.model.compute_logits(hidden[sample_rows])  # [N, V] fp32
        if not drafts:
            states = [self._states[rid] for rid in sample_ids]
            sampled = self.sampler(logits, [s.params for s in states], [len(s.token_ids) for s in states])
            tokens, logprobs, router_counts = sampled.to_host_with(router_counts)  # the step's one device-to-host copy
            for state, token in zip(states, tokens, strict=True):
                state.token_ids.append(token)
            return ModelRunnerOutput(sample_ids, [[t] for t in tokens], [None if lp is None else [lp] for lp in logprobs],
                                     router_counts.cpu())
        return self._verify(logits, sample_ids, proposed, router_counts)

    def _propose(self, sched: SchedulerOutput) -> dict[str, list[int]]:
        """Proposals for the requests with a speculation budget (none without a proposer)."""
        if self.proposer is None or not sched.num_spec_tokens:
            return {}
        asks = [ProposalRequest(rid, s.token_ids, s.block_ids, k) for rid, k in sched.num_spec_tokens.items()
                for s in (self._states[rid],)]
        return {a.request_id: d[: a.k] for a, d in zip(asks, self.proposer.propose(asks), strict=True) if d}

    def _verify(self, logits: torch.Tensor, sample_ids: list[str], proposed: list[list[int]],
                router_counts: torch.Tensor) -> ModelRunnerOutput:
        """Each request's rows are its last known token then its proposals: row j checks proposal j (the
        last row has none). It keeps tokens up to its first row that does not accept."""
        params, positions, drafts = [], [], []
        for rid, props in zip(sample_ids, proposed, strict=True):
            state = self._states[rid]
            params += [state.params] * (len(props) + 1)
            positions += range(len(state.token_ids), len(state.token_ids) + len(props) + 1)
            drafts += [*props, -1]
        verified = self.sampler.verify(logits, params, positions, drafts)
        tokens, accepted, logprobs, router_counts = verified.to_host_verified(router_counts)  # one copy
        out_tokens, out_logprobs, row = [], [], 0
        for rid, props in zip(sample_ids, proposed, strict=True):
            n = len(props) + 1
            keep = next((j for j in range(n) if not accepted[row + j]), n - 1) + 1  # through the first reject
            got = tokens[row : row + keep]
            self._states[rid].token_ids.extend(got)
            out_tokens.append(got)
            lps = logprobs[row : row + keep]
            out_logprobs.append(None if lps[0] is None else lps)
            row += n
        return ModelRunnerOutput(sample_ids, out_tokens, out_logprobs, router_counts.cpu(),
                                 [len(p) for p in proposed])

    def _update_states(self, sched: SchedulerOutput) -> None:
        for rid in sched.finished_request_ids:  # before new ones: a resumed request comes back as new
            self._states.pop(rid, None)
            if self.proposer is not None:
                self.proposer.drop(rid)
        for new in sched.new_requests:
            self._states[new.request_id] = _RequestState(list(new.token_ids), list(new.block_ids), new.params)
        for cached in sched.cached_requests:
            self._states[cached.request_id].block_ids.extend(cached.new_block_ids)

    def _flatten(self, sched: SchedulerOutput, drafts: dict[str, list[int]]
                 ) -> tuple[HostBatch, list[str], list[list[int]]]:
        """The scheduled tokens of every request in one flat batch, each followed by its proposals; the
        requests that sample (those computed up to their last token) and their proposals, aligned."""
        b = HostBatch(self.block_size)
        sample_ids, proposed = [], []
        for rid, n in sched.num_scheduled_tokens.items():
            state = self._states[rid]
            start, end = sched.num_computed_tokens[rid], sched.num_computed_tokens[rid] + n
            props = drafts.get(rid, [])
            samples = 0
            if end == len(state.token_ids):  # computed up to its last token: sample the next one
                samples = len(props) + 1
                sample_ids.append(rid)
                proposed.append(props)
            b.add(state.token_ids[start:end] + props, state.block_ids, start, samples)
        return b, sample_ids, proposed
