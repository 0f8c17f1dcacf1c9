"""Pick the next token of each row from its logits, on the logits' device: greedy, or temperature + top-k +
top-p + min-p; plus the logprobs a row asks for.

Random draws use the exponential-race form of sampling (argmax of p / q with q ~ Exp(1)), which equals
sampling from p. A seeded request takes its q from a counter-based hash of (seed, position of the token,
token id) (`hash_uniform`), so its tokens depend on nothing else in the batch, on no generator state, nor on
whether it was preempted and recomputed. Unseeded rows share one generator per sampler and device.

NOTE(sampler) on the contract: `Sampler.__call__` reads the parameters from the host lists it is given and
only queues device work (its host-to-device copies are pinned and non-blocking), so it never waits for the
device; its result holds device tensors. `SampledTokens.to_host` is the step's one device-to-host copy and
its one wait. Anything else the step wants on the host (the router counts) rides along via `to_host_with`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_runtime.engine.outputs import TokenLogprob
from moe_runtime.engine.sampling_params import SamplingParams

# N rows (requests that sample this step), S of them not greedy, R of those truncated (top-k/p, min-p),
# Z of those seeded, M rows that ask for logprobs, K the most alternatives any of them asks for, V vocab.

_U64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15 - (1 << 64)  # splitmix64's odd increment (golden ratio), as a signed int64
_MUL1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # splitmix64's finalizer multipliers (Stafford's mix 13), signed
_MUL2 = 0x94D049BB133111EB - (1 << 64)
_NO_TOP_K = 1 << 62  # the top_k of a row without top-k: more than any vocabulary


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64: torch's `>>` is arithmetic, so clear the copied sign bits."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 words, a bijection (int64 multiplication wraps mod 2**64)."""
    z = (z ^ _shr(z, 30)) * _MUL1
    z = (z ^ _shr(z, 27)) * _MUL2
    return z ^ _shr(z, 31)


def seed_as_int64(seed: int) -> int:
    """Any Python int as the int64 with the same low 64 bits (seeds equal mod 2**64 draw alike)."""
    return ((seed & _U64) ^ (1 << 63)) - (1 << 63)


def hash_uniform(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """u[z, t] in (0, 1) for token t of the row with seeds[z] at positions[z]: stateless and reproducible.

    seeds, positions: [Z] int64 on any device (seeds reduced by `seed_as_int64`). Returns u [Z, V] float32
    on that device. Each row is a splitmix64 stream that starts at a hash of (seed, position):
        key = mix64(mix64(seed) ^ position)
        u[t] = (top 24 bits of mix64(key + (t + 1) * GAMMA), the lowest of them set to 1) * 2**-24
    so u takes the 2**23 odd multiples of 2**-24: never 0 or 1, and exact in float32. Only int64 arithmetic
    (wrapping multiply, masked shifts) and one exact int -> float conversion: CPU and CUDA give bit-identical
    u. Example: seed 0 at position 0 is splitmix64 seeded with 0, whose first word is 0xE220A8397B1DCDAF
    (tests/engine/test_sampling.py also checks a pure-Python splitmix64):

    >>> u = hash_uniform(torch.tensor([0]), torch.tensor([0]), 3)
    >>> u
    tensor([[0.8833, 0.4315, 0.0264]])
    >>> u[0, 0].item() == 0xE220A9 / 2**24
    True
    """
    key = _mix64(_mix64(seeds) ^ positions)  # [Z]
    counter = torch.arange(1, vocab_size + 1, device=seeds.device) * _GAMMA  # [V], wraps
    z = _mix64(key[:, None] + counter[None, :])  # [Z, V]
    return (_shr(z, 40) | 1).to(torch.float32) * 2.0**-24  # [Z, V]


@dataclass(frozen=True)
class SampledTokens:
    """One step's sampled tokens and logprobs, still on the logits' device. Read them with `to_host`."""

    token_ids: torch.Tensor  # [N] int64
    logprob_rows: tuple[int, ...] = ()  # rows that asked for logprobs, [M], ascending
    num_top: tuple[int, ...] = ()  # alternatives each of those rows asked for, [M]
    chosen_logprobs: torch.Tensor | None = None  # [M] fp32, log_softmax(raw logits) at the chosen token
    top_ids: torch.Tensor | None = None  # [M, K] int64, the K most likely tokens, most likely first
    top_logprobs: torch.Tensor | None = None  # [M, K] fp32, their logprobs

    def to_host(self) -> tuple[list[int], list[TokenLogprob | None]]:
        """(token id of each row [N], its TokenLogprob or None where the row did not ask), through one
        device-to-host copy, which waits for the step's device work. On the CPU nothing is copied."""
        token_ids, logprobs, _ = self._fetch(None)
        return token_ids, logprobs

    def to_host_with(self, extra: torch.Tensor) -> tuple[list[int], list[TokenLogprob | None], torch.Tensor]:
        """`to_host`, plus `extra` (int64 or float32, any shape, on the logits' device or the CPU; e.g. the
        step's router counts [L, E]) on the CPU, in the same single copy."""
        return self._fetch(extra)

    def _fetch(self, extra: torch.Tensor | None) -> tuple[list[int], list[TokenLogprob | None], torch.Tensor | None]:
        """Both of the above: `extra` on the CPU, or None when there is none."""
        tensors = [self.token_ids]
        if self.logprob_rows:
            tensors += [self.chosen_logprobs, self.top_ids, self.top_logprobs]
        if extra is not None:
            tensors.append(extra)
        host = _one_copy_to_host(tensors)
        token_ids = host[0].tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(token_ids)
        if self.logprob_rows:
            chosen, top_ids, top_vals = host[1].tolist(), host[2].tolist(), host[3].tolist()
            for j, (row, n) in enumerate(zip(self.logprob_rows, self.num_top, strict=True)):
                top = tuple(zip(top_ids[j][:n], top_vals[j][:n], strict=True))
                logprobs[row] = TokenLogprob(token_ids[row], chosen[j], top)
        return token_ids, logprobs, host[-1] if extra is not None else None


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
        if not lp_rows:
            return SampledTokens(tokens)
        every_row = len(lp_rows) == n
        lp = torch.log_softmax(logits if every_row else logits.index_select(0, lp_idx), dim=-1)  # [M, V]
        chosen = lp.gather(1, (tokens if every_row else tokens.index_select(0, lp_idx))[:, None]).squeeze(1)
        num_top = tuple(params[i].logprobs for i in lp_rows)
        top_logprobs, top_ids = lp.topk(max(num_top), dim=-1)  # [M, K]
        return SampledTokens(tokens, tuple(lp_rows), num_top, chosen, top_ids, top_logprobs)

    def _sample(self, logits: torch.Tensor, rows: _SampleRows) -> torch.Tensor:
        """The non-greedy rows: logits [S, V] float32 -> tokens [S] int64, on the logits' device."""
        num_rows, vocab = logits.shape
        probs = torch.softmax(logits / rows.temperature[:, None], dim=-1)  # [S, V]
        num_truncated = rows.truncated.shape[0]  # R
        if num_truncated == num_rows:
            probs = _truncate(probs, rows.top_k, rows.top_p, rows.min_p)
        elif num_truncated:
            cut = _truncate(probs.index_select(0, rows.truncated), rows.top_k, rows.top_p, rows.min_p)  # [R, V]
            probs.index_copy_(0, rows.truncated, cut)
        num_seeded = rows.seeded.shape[0]  # Z
        if num_seeded == num_rows:
            q = hash_uniform(rows.seeds, rows.positions, vocab).log_().neg_()  # [S, V]
        else:
            # One draw for all unseeded rows. -log(U) is Exp(1), and on the CPU 6x faster than exponential_
            # (1.7 vs 9.7 ms for [16, 32000]); U < 1, so q > 0 (U = 0 gives q = inf: that token scores 0).
            q = torch.rand(num_rows - num_seeded, vocab, device=logits.device, generator=self._generator(logits.device))
            q = q.log_().neg_()  # [S - Z, V]
            if num_seeded:
                q_seeded = hash_uniform(rows.seeds, rows.positions, vocab).log_().neg_()  # [Z, V]
                q = torch.empty_like(probs).index_copy_(0, rows.unseeded, q).index_copy_(0, rows.seeded, q_seeded)
        return probs.div_(q).argmax(dim=-1)  # [S]

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
