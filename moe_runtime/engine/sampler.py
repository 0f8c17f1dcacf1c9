"""Pick the next token of each row from its logits, on the logits' device: greedy, or temperature + top-k +
top-p + min-p; plus the logprobs a row asks for.

Random draws use the exponential-race form of sampling (argmax of p / q with q ~ Exp(1)), which equals
sampling from p. A seeded request takes its q from a counter-based hash of (seed, position of the token,
token id) (`hash_uniform`), so its tokens depend on nothing else in the batch, on no generator state, nor on
whether it was preempted and recomputed. Unseeded rows share one generator per sampler and device.

Speculative decoding verifies proposed tokens with `Sampler.verify` (the same parameters, one row per
position a proposal is checked at): see its docstring for the rule, which keeps the model's distribution.

NOTE(sampler) on the contract: `Sampler.__call__` and `verify` read the parameters from the host lists it is given and
only queues device work (its host-to-device copies are pinned and non-blocking), so it never waits for the
device; its result holds device tensors. `SampledTokens.to_host` is the step's one device-to-host copy and
its one wait. Anything else the step wants on the host (the router counts) rides along via `to_host_with`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_runtime.engine.draws import hash_uniform, seed_as_int64
from moe_runtime.engine.outputs import TokenLogprob
from moe_runtime.engine.sampling_params import SamplingParams

# N rows (requests that sample this step), S of them not greedy, R of those truncated (top-k/p, min-p),
# Z of those seeded, M rows that ask for logprobs, K the most alternatives any of them asks for, V vocab.

_NO_TOP_K = 1 << 62  # the top_k of a row without top-k: more than any vocabulary

@dataclass(frozen=True)
class SampledTokens:
    """One step's sampled tokens and logprobs, still on the logits' device. Read them with `to_host`."""

    token_ids: torch.Tensor  # [N] int64
    logprob_rows: tuple[int, ...] = ()  # rows that asked for logprobs, [M], ascending
    num_top: tuple[int, ...] = ()  # alternatives each of those rows asked for, [M]
    chosen_logprobs: torch.Tensor | None = None  # [M] fp32, log_softmax(raw logits) at the chosen token
    top_ids: torch.Tensor | None = None  # [M, K] int64, the K most likely tokens, most likely first
    top_logprobs: torch.Tensor | None = None  # [M, K] fp32, their logprobs
    accepted: torch.Tensor | None = None  # [N] bool, from `Sampler.verify`: the row's proposal was accepted

    def to_host(self) -> tuple[list[int], list[TokenLogprob | None]]:
        """(token id of each row [N], its TokenLogprob or None where the row did not ask), through one
        device-to-host copy, which waits for the step's device work. On the CPU nothing is copied."""
        token_ids, _, logprobs, _ = self._fetch(None)
        return token_ids, logprobs

    def to_host_with(self, extra: torch.Tensor) -> tuple[list[int], list[TokenLogprob | None], torch.Tensor]:
        """`to_host`, plus `extra` (int64 or float32, any shape, on the logits' device or the CPU; e.g. the
        step's router counts [L, E]) on the CPU, in the same single copy."""
        token_ids, _, logprobs, extra = self._fetch(extra)
        return token_ids, logprobs, extra

    def to_host_verified(self, extra: torch.Tensor) -> tuple[list[int], list[bool], list[TokenLogprob | None],
                                                              torch.Tensor]:
        """`to_host_with` for the result of `Sampler.verify`: also whether each row's proposal was accepted."""
        assert self.accepted is not None, "not a verification result"
        token_ids, accepted, logprobs, extra = self._fetch(extra)
        return token_ids, accepted, logprobs, extra

    def _fetch(self, extra: torch.Tensor | None):
        """All of the above: (tokens, accepted flags or None, logprobs, `extra` on the CPU or None)."""
        tensors = [self.token_ids]
        if self.accepted is not None:
            tensors.append(self.accepted.long())
        if self.logprob_rows:
            tensors += [self.chosen_logprobs, self.top_ids, self.top_logprobs]
        if extra is not None:
            tensors.append(extra)
        host = _one_copy_to_host(tensors)
        token_ids = host[0].tolist()
        accepted = None if self.accepted is None else [bool(a) for a in host[1].tolist()]
        at = 1 if self.accepted is None else 2  # where the logprob tensors start
        logprobs: list[TokenLogprob | None] = [None] * len(token_ids)
        if self.logprob_rows:
            chosen, top_ids, top_vals = host[at].tolist(), host[at + 1].tolist(), host[at + 2].tolist()
            for j, (row, n) in enumerate(zip(self.logprob_rows, self.num_top, strict=True)):
                top = tuple(zip(top_ids[j][:n], top_vals[j][:n], strict=True))
                logprobs[row] = TokenLogprob(token_ids[row], chosen[j], top)
        return token_ids, accepted, logprobs, host[-1] if extra is not None else None


def _one_copy_to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors (int64 or float32) on the CPU: those on a device go in one device-to-host copy, float32
    bits riding in the int64 buffer as sign-extended int32, so every value comes back exact."""
    moved = [i for i, t in enumerate(tensors) if t.device.type != "cpu"]
    if not moved:
        return tensors
    for i in moved:
        t = tensors[i]
        assert t.dtype in (torch.int64, torch.float32) and t.device == tensors[moved[0]].device, (t.dtype, t.device)
    flat = [t.reshape(-1) if t.dtype == torch.int64 else t.reshape(-1).view(torch.int32).long()
            for t in (tensors[i] for i in moved)]
    host = torch.cat(flat).cpu()  # the one copy; it waits for the device
    out = list(tensors)
    for i, part in zip(moved, host.split([tensors[i].numel() for i in moved]), strict=True):
        t = tensors[i]
        out[i] = (part if t.dtype == torch.int64 else part.int().view(torch.float32)).view(t.shape)
    return out


class Sampler:
    """Chooses each row's next token on the logits' device. `seed` seeds the draws of unseeded requests
    (one generator per device, made at first use); seeded requests never touch it."""

    def __init__(self, seed: int | None = None):
        self.seed = seed if seed is not None else torch.Generator().seed()  # leaves the global RNG alone
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> SampledTokens:
        """logits: [N, V] float32 on any device; params[i], positions[i]: row i's request and the position its
        token will take. Returns the tokens (and logprobs) on the logits' device without waiting for it;
        `SampledTokens.to_host` brings them over."""
        assert logits.dim() == 2 and logits.shape[0] == len(params) == len(positions), (logits.shape, len(params))
        if all(p.greedy and p.logprobs is None for p in params):
            return SampledTokens(logits.argmax(dim=-1))  # the common case: one kernel, nothing uploaded
        n = len(params)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        sampled_idx, lp_idx = _upload(logits.device, torch.int64, sampled, lp_rows)
        if not sampled:
            tokens = logits.argmax(dim=-1)  # [N]
        else:
            rows = _SampleRows.upload([params[i] for i in sampled], [positions[i] for i in sampled], logits.device)
            if len(sampled) == n:
                tokens = self._sample(logits, rows)  # [N]
            else:
                tokens = logits.argmax(dim=-1)  # [N]; greedy rows keep this
                tokens.index_copy_(0, sampled_idx, self._sample(logits.index_select(0, sampled_idx), rows))
        return _with_logprobs(logits, tokens, params, lp_rows, lp_idx)

    def verify(self, logits: torch.Tensor, params: list[SamplingParams], positions: list[int],
               drafts: list[int]) -> SampledTokens:
        """Check proposed tokens (speculative decoding): row i holds the logits for a position whose proposed
        token is drafts[i], or -1 where none was proposed (the row after a request's last proposal). Returns
        each row's token and whether its proposal is accepted (`SampledTokens.accepted`).

        Greedy rows accept when the argmax is the proposal, and their token is the argmax. Sampled rows
        accept with probability p(draft) under the row's distribution p (temperature, top-k/p, min-p), else
        draw from p with the draft removed: for a deterministic proposal that is the rejection rule of
        speculative sampling, so each emitted token is distributed exactly as without speculation. A row
        without a proposal never accepts and draws from p. The caller keeps a request's tokens up to and
        including its first row that does not accept. Example (greedy): argmaxes [5, 9, 4] for drafts
        [5, 7, -1] give tokens [5, 9, 4], accepted [True, False, False]: the request emits 5, 9.
        """
        n = len(params)
        assert logits.dim() == 2 and logits.shape[0] == n == len(positions) == len(drafts), (logits.shape, n)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        draft, sampled_idx, lp_idx = _upload(logits.device, torch.int64, drafts, sampled, lp_rows)
        tokens = logits.argmax(dim=-1)  # [N]
        accepted = tokens == draft  # [N]; never for -1
        if sampled:
            rows = _SampleRows.upload([params[i] for i in sampled], [positions[i] for i in sampled], logits.device)
            probs = _probs(logits.index_select(0, sampled_idx), rows)  # [S, V], truncated, not renormalized
            u = self._uniforms(rows, probs.shape, logits.device)  # [S, V]
            d = draft.index_select(0, sampled_idx)  # [S]
            has = d >= 0
            col = d.clamp(min=0)[:, None]  # [S, 1]
            p_draft = probs.gather(1, col).squeeze(1)  # [S]
            accept = has & (u.gather(1, col).squeeze(1) * probs.sum(dim=-1) < p_draft)  # u < p(d) / sum(p)
            probs.scatter_(1, col, torch.where(has, 0.0, p_draft)[:, None])  # p without the draft
            residual = probs.div_(u.log_().neg_()).argmax(dim=-1)  # [S]
            tokens.index_copy_(0, sampled_idx, torch.where(accept, d, residual))
            accepted.index_copy_(0, sampled_idx, accept)
        out = _with_logprobs(logits, tokens, params, lp_rows, lp_idx)
        return SampledTokens(out.token_ids, out.logprob_rows, out.num_top, out.chosen_logprobs, out.top_ids,
                             out.top_logprobs, accepted)

    def _sample(self, logits: torch.Tensor, rows: _SampleRows) -> torch.Tensor:
        """The non-greedy rows: logits [S, V] float32 -> tokens [S] int64, on the logits' device."""
        probs = _probs(logits, rows)  # [S, V]
        q = self._uniforms(rows, probs.shape, logits.device).log_().neg_()  # [S, V] ~ Exp(1)
        return probs.div_(q).argmax(dim=-1)  # [S]

    def _uniforms(self, rows: _SampleRows, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """u [S, V] in (0, 1): hashed for seeded rows, one generator draw for the others."""
        num_rows, vocab = shape
        num_seeded = rows.seeded.shape[0]  # Z
        if num_seeded == num_rows:
            return hash_uniform(rows.seeds, rows.positions, vocab)  # [S, V]
        # One draw for all unseeded rows. -log(U) is Exp(1), and on the CPU 6x faster than exponential_
        # (1.7 vs 9.7 ms for [16, 32000]); U < 1, so q > 0 (U = 0 gives q = inf: that token scores 0).
        u = torch.rand(num_rows - num_seeded, vocab, device=device, generator=self._generator(device))  # [S - Z, V]
        if num_seeded:
            u_seeded = hash_uniform(rows.seeds, rows.positions, vocab)  # [Z, V]
            u = torch.empty(shape, device=device).index_copy_(0, rows.unseeded, u).index_copy_(0, rows.seeded, u_seeded)
        return u

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]


@dataclass(frozen=True)
class _SampleRows:
    """Settings of the S non-greedy rows, on the device. Row indices count within those S rows; R and Z are
    shapes, so choosing a path never reads the device."""

    temperature: torch.Tensor  # [S] fp32
    truncated: torch.Tensor  # [R] int64, rows with top-k, top-p or min-p
    top_k: torch.Tensor  # [R] int64, _NO_TOP_K where off
    top_p: torch.Tensor  # [R] fp32
    min_p: torch.Tensor  # [R] fp32
    seeded: torch.Tensor  # [Z] int64
    seeds: torch.Tensor  # [Z] int64 (`seed_as_int64`)
    positions: torch.Tensor  # [Z] int64
    unseeded: torch.Tensor  # [S - Z] int64

    @staticmethod
    def upload(params: list[SamplingParams], positions: list[int], device: torch.device) -> _SampleRows:
        """params, positions: the S non-greedy rows' (host lists). Two non-blocking copies, one per dtype."""
        trunc = [j for j, p in enumerate(params) if p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0]
        seeded = [j for j, p in enumerate(params) if p.seed is not None]
        truncated, top_k, seeded_idx, seeds, seeded_positions, unseeded = _upload(
            device, torch.int64, trunc, [params[j].top_k if params[j].top_k > 0 else _NO_TOP_K for j in trunc],
            seeded, [seed_as_int64(params[j].seed) for j in seeded], [positions[j] for j in seeded],
            [j for j, p in enumerate(params) if p.seed is None],
        )
        temperature, top_p, min_p = _upload(
            device, torch.float32, [p.temperature for p in params], [params[j].top_p for j in trunc],
            [params[j].min_p for j in trunc],
        )
        return _SampleRows(temperature, truncated, top_k, top_p, min_p, seeded_idx, seeds, seeded_positions, unseeded)


def _probs(logits: torch.Tensor, rows: _SampleRows) -> torch.Tensor:
    """Each non-greedy row's distribution: softmax(logits / temperature) with top-k, top-p and min-p
    applied (excluded tokens zeroed, not renormalized). logits: [S, V] float32 -> [S, V] float32."""
    num_rows = logits.shape[0]
    probs = torch.softmax(logits / rows.temperature[:, None], dim=-1)  # [S, V]
    num_truncated = rows.truncated.shape[0]  # R
    if num_truncated == num_rows:
        return _truncate(probs, rows.top_k, rows.top_p, rows.min_p)
    if num_truncated:
        cut = _truncate(probs.index_select(0, rows.truncated), rows.top_k, rows.top_p, rows.min_p)  # [R, V]
        probs.index_copy_(0, rows.truncated, cut)
    return probs


def _with_logprobs(logits: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams], lp_rows: list[int],
                   lp_idx: torch.Tensor) -> SampledTokens:
    """`tokens` [N] with the logprobs the rows in `lp_rows` ask for (log_softmax of the raw logits)."""
    if not lp_rows:
        return SampledTokens(tokens)
    every_row = len(lp_rows) == len(params)
    lp = torch.log_softmax(logits if every_row else logits.index_select(0, lp_idx), dim=-1)  # [M, V]
    chosen = lp.gather(1, (tokens if every_row else tokens.index_select(0, lp_idx))[:, None]).squeeze(1)
    num_top = tuple(params[i].logprobs for i in lp_rows)
    top_logprobs, top_ids = lp.topk(max(num_top), dim=-1)  # [M, K]
    return SampledTokens(tokens, tuple(lp_rows), num_top, chosen, top_ids, top_logprobs)


def _upload(device: torch.device, dtype: torch.dtype, *lists: list) -> list[torch.Tensor]:
    """The host lists as 1-D tensors of `dtype` on `device`, through one pinned, non-blocking copy."""
    on_cpu = device.type == "cpu"
    flat = torch.tensor([x for xs in lists for x in xs], dtype=dtype, pin_memory=not on_cpu)
    if not on_cpu:
        flat = flat.to(device, non_blocking=True)
    return list(flat.split([len(xs) for xs in lists]))


def _truncate(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero the tokens that top-k, top-p and min-p exclude; the most likely token always stays.

    probs: [R, V] float32; top_k: [R] int64 (_NO_TOP_K: off); top_p, min_p: [R] float32. Returns [R, V].
    Example: top_p 0.7 keeps 0.5 and 0.3 (0.5 alone is below 0.7), and min_p 0.5 would keep 0.5 and 0.3 too:

    >>> _truncate(torch.tensor([[0.5, 0.1, 0.3, 0.1]]), torch.tensor([_NO_TOP_K]), torch.tensor([0.7]),
    ...           torch.tensor([0.0]))
    tensor([[0.5000, 0.0000, 0.3000, 0.0000]])
    """
    sorted_p, order = probs.sort(dim=-1, descending=True)  # [R, V]
    rank = torch.arange(probs.shape[1], device=probs.device)[None, :]  # [1, V]
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p  # [R, V]: probability of the more likely tokens
    drop = (rank >= top_k[:, None]) | (mass_before >= top_p[:, None]) | (sorted_p < min_p[:, None] * sorted_p[:, :1])
    drop[:, 0] = False
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_p)
