"""Draft-model proposals: a small model with the target's vocabulary proposes k tokens greedily.

The draft keeps its own KV cache, with as many blocks as the target's and indexed by the target's block
tables, so it needs no block manager of its own: block b holds the draft's KV for the same tokens as the
target's block b. Per step, one forward catches each request up (the tokens accepted since its last run
and its last token), whose argmax is the first proposal; then k - 1 one-token steps propose the rest.
Proposals the target rejected leave stale KV behind the request's last accepted token, which the next
catch-up overwrites: the draft remembers which tokens its cache holds and recomputes from the first that
differs.

Greedy proposals are deterministic, so `Sampler.verify` checks them with the point-mass rule, which keeps
the target's distribution for sampled requests too (with fewer acceptances than the draft's own
distribution would give).
"""

from __future__ import annotations

from moe_runtime.config import ModelConfig, RuntimeConfig
from moe_runtime.engine.batch import HostBatch
from moe_runtime.engine.forward import StepForward
from moe_runtime.engine.spec.proposer import ProposalRequest
from moe_runtime.errors import ConfigError
from moe_runtime.model.causal_lm import CausalLM

# B requests proposing this step, V vocabulary


class DraftProposer:
    """`speculative.method: draft`."""

    def __init__(self, model: CausalLM, forward: StepForward, block_size: int):
        self.model, self.forward, self.block_size = model, forward, block_size
        self._cached: dict[str, list[int]] = {}  # request id -> the tokens whose KV the draft cache holds
        self._real: dict[str, int] = {}  # request id -> tokens known to be the request's own at the last call

    def propose(self, requests: list[ProposalRequest]) -> list[list[int]]:
        """Up to `r.k` greedy proposals per request (every request with k >= 1 gets k), aligned."""
        batch = HostBatch(self.block_size)
        for r in requests:
            start = self._first_stale(r)
            batch.add(r.token_ids[start:], r.block_ids, start, num_samples=1)
        proposals = [[t] for t in self._argmax(batch)]
        for step in range(1, max(r.k for r in requests)):
            batch, active = HostBatch(self.block_size), []
            for i, r in enumerate(requests):
                if r.k > step:
                    batch.add(proposals[i][-1:], r.block_ids, len(r.token_ids) + step - 1, num_samples=1)
                    active.append(i)
            for i, t in zip(active, self._argmax(batch), strict=True):
                proposals[i].append(t)
        for r, props in zip(requests, proposals, strict=True):
            self._cached[r.request_id] = r.token_ids + props[:-1]  # the last proposal was never fed back
            self._real[r.request_id] = len(r.token_ids)
        return proposals

    def drop(self, request_id: str) -> None:
        self._cached.pop(request_id, None)
        self._real.pop(request_id, None)

    def _first_stale(self, r: ProposalRequest) -> int:
        """The first position whose draft KV is missing or was computed for another token (a rejected
        proposal). Tokens the request had at the last call are its own for good; only the few proposals
        after them need comparing. Always before the last token, which the target computes this step too."""
        cached = self._cached.get(r.request_id, [])
        end = min(len(cached), len(r.token_ids) - 1)
        i = min(self._real.get(r.request_id, 0), end)
        while i < end and cached[i] == r.token_ids[i]:
            i += 1
        return i

    def _argmax(self, batch: HostBatch) -> list[int]:
        """The draft's greedy next token after each sequence of `batch` (one device-to-host copy)."""
        inputs, rows = batch.to_device(self.model.device)
        hidden, _ = self.forward(inputs)  # [T, D]
        return self.model.compute_logits(hidden[rows]).argmax(dim=-1).tolist()  # [B]


def load_draft(cfg: RuntimeConfig, target: ModelConfig, num_blocks: int, progress: bool = False) -> DraftProposer:
    """The draft checkpoint of `speculative.draft_model`, built like the target (same device, dtype rule and
    kernel choice), with a KV cache of `num_blocks` blocks. A `ConfigError` when its vocabulary differs."""
    from moe_runtime.checkpoint.layout import resolve_dtype
    from moe_runtime.checkpoint.loader import load_weights, read_config, resolve_device
    from moe_runtime.engine.kv_cache import allocate_kv_cache
    from moe_runtime.engine.parts import choose_kernels, cpu_plan, make_forward, model_parts
    from moe_runtime.model.experts import LocalExpertsBuilder

    path = cfg.speculative.draft_model
    assert path is not None
    draft_cfg = read_config(path)
    if draft_cfg.vocab_size != target.vocab_size:
        raise ConfigError(f"speculative.draft_model={path!r}: vocab_size {draft_cfg.vocab_size} differs from the "
                          f"model's {target.vocab_size}; allowed: a draft with the model's tokenizer")
    load_cfg = cfg.model.model_copy(update={"path": path})
    dtype, device = resolve_dtype(load_cfg.dtype, draft_cfg), resolve_device(load_cfg.device)
    kernels = choose_kernels(load_cfg, device, dtype)
    plan = cpu_plan(kernels, draft_cfg, dtype, cfg.engine, sets_tiles=False)  # the target's tiles stay
    experts = LocalExpertsBuilder(kernels.moe, None if plan is None else plan.expert)
    model = load_weights(path, load_cfg, model_parts(kernels, experts, plan), progress)
    kv = allocate_kv_cache(draft_cfg, num_blocks, cfg.cache.block_size, model.dtype, model.device)
    forward = make_forward(model, kv, kernels, cfg.engine, graphs_allowed=True, plan=plan)
    return DraftProposer(model, forward, cfg.cache.block_size)
