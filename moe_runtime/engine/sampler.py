"""Pick the next token of each row from its logits: greedy, or temperature + top-k + top-p + min-p.

Random draws use the exponential-race form of sampling (argmax of p / q with q ~ Exp(1)), which equals
sampling from p. A seeded request draws its q from a generator seeded by (seed, position of the token), so
its tokens depend on nothing else in the batch, nor on whether it was preempted and recomputed.
"""

from __future__ import annotations

import torch

from moe_runtime.engine.outputs import TokenLogprob
from moe_runtime.engine.sampling_params import SamplingParams

# N rows (requests that sample this step), V vocab

_MIX = 0x9E3779B97F4A7C15  # golden-ratio multiplier: spreads (seed, position) pairs over the seed space


class Sampler:
    def __init__(self, seed: int | None = None):
        self.generator = torch.Generator()  # draws of unseeded requests (one per sampler, not global)
        self.generator.manual_seed(seed if seed is not None else torch.seed())

    def __call__(
        self, logits: torch.Tensor, params: list[SamplingParams], positions: list[int]
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits: [N, V] float32; positions[i]: the position the sampled token of row i will take.

        Returns the token ids [N] and, for rows that ask, their logprobs.
        """
        if all(p.greedy and p.logprobs is None for p in params):
            return logits.argmax(dim=-1).tolist(), [None] * len(params)
        logits = logits.cpu()  # the generators, and the per-row loops below, live on the host
        tokens = logits.argmax(dim=-1)  # [N]; greedy rows keep this
        sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
        if sampled_rows:
            rows = torch.tensor(sampled_rows)
            tokens[rows] = self._sample(logits[rows], [params[i] for i in sampled_rows],
                                        [positions[i] for i in sampled_rows])
        token_list = tokens.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(params)
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if lp_rows:
            for i, lp in zip(lp_rows, _logprobs(logits[lp_rows], [token_list[i] for i in lp_rows],
                                                [params[i].logprobs for i in lp_rows]), strict=True):
                logprobs[i] = lp
        return token_list, logprobs

    def _sample(self, logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> torch.Tensor:
        """Non-greedy rows: logits [n, V] -> tokens [n]."""
        temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype)
        probs = torch.softmax(logits / temperature[:, None], dim=-1)  # [n, V]
        if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in params):
            probs = _truncate(probs, params)
        q = torch.empty_like(probs)
        unseeded = [i for i, p in enumerate(params) if p.seed is None]
        if unseeded:
            q[unseeded] = torch.empty(len(unseeded), probs.shape[1]).exponential_(generator=self.generator)
        for i, (p, pos) in enumerate(zip(params, positions, strict=True)):
            if p.seed is not None:
                g = torch.Generator().manual_seed((p.seed * _MIX + pos) & (2**63 - 1))
                q[i].exponential_(generator=g)
        return (probs / q).argmax(dim=-1)  # [n]


def _truncate(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Zero the tokens that top-k, top-p and min-p exclude (the most likely token always stays)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)  # [n, V]
    rank = torch.arange(probs.shape[1])[None, :]  # [1, V]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else probs.shape[1] for p in params])[:, None]  # [n, 1]
    top_p = torch.tensor([p.top_p for p in params], dtype=probs.dtype)[:, None]
    min_p = torch.tensor([p.min_p for p in params], dtype=probs.dtype)[:, None]
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p  # [n, V]: probability of the more likely tokens
    drop = (rank >= top_k) | (mass_before >= top_p) | (sorted_p < min_p * sorted_p[:, :1])
    drop[:, 0] = False
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_p)


def _logprobs(logits: torch.Tensor, chosen: list[int], num_top: list[int]) -> list[TokenLogprob]:
    """log_softmax of the raw logits [n, V]: the chosen token's value and the top alternatives."""
    lp = torch.log_softmax(logits, dim=-1)  # [n, V]
    chosen_lp = lp.gather(1, torch.tensor(chosen)[:, None]).squeeze(1).tolist()
    k = max(num_top)
    top_vals, top_ids = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long())
    top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
    return [
        TokenLogprob(t, c, tuple(zip(ids[:n], vals[:n], strict=True)))
        for t, c, ids, vals, n in zip(chosen, chosen_lp, top_ids, top_vals, num_top, strict=True)
    ]
