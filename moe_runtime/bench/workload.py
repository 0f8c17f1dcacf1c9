"""What a serving benchmark sends, and when: seeded prompts and output lengths, and Poisson arrival times.

Prompts are token ids, not text, so that their lengths are exact (text would be re-tokenized by the server
into an unknown count). The ids are drawn uniformly from `TOKEN_ID_RANGE`, a range inside every vocabulary
this runtime serves that avoids the special tokens at the start of Llama/Mixtral vocabularies. With
`shared_prefix_tokens` N, every prompt starts with the same N ids (a system prompt, few-shot examples),
which the server's prefix cache can reuse; the prompt length drawn is the length after the prefix.

The same seed gives the same workload, whatever the server, so two runs compare like for like.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TOKEN_ID_RANGE = (100, 1000)  # [low, high): ordinary tokens in any vocabulary of 1000 or more
DISTRIBUTIONS = ("fixed", "uniform", "normal")


@dataclass(frozen=True)
class LengthDist:
    """A distribution of lengths in tokens, from a spec: `fixed:N`, `uniform:LOW:HIGH` (inclusive) or
    `normal:MEAN:STD` (rounded, at least 1)."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str, name: str) -> LengthDist:
        """`ValueError` naming the option (`name`), the spec and the allowed forms."""
        kind, _, rest = spec.partition(":")
        allowed = f"{name}={spec!r}: allowed: fixed:N, uniform:LOW:HIGH or normal:MEAN:STD (tokens), e.g. uniform:64:256"
        try:
            values = [float(v) for v in rest.split(":")] if rest else []
        except ValueError:
            raise ValueError(allowed) from None
        if kind not in DISTRIBUTIONS or len(values) != (1 if kind == "fixed" else 2):
            raise ValueError(allowed)
        if kind == "fixed" and (values[0] < 1 or values[0] != int(values[0])):
            raise ValueError(f"{name}={spec!r}: N must be a whole number >= 1")
        if kind == "uniform" and not (1 <= values[0] <= values[1] and all(v == int(v) for v in values)):
            raise ValueError(f"{name}={spec!r}: LOW and HIGH must be whole numbers with 1 <= LOW <= HIGH")
        if kind == "normal" and not (values[0] >= 1 and values[1] >= 0):
            raise ValueError(f"{name}={spec!r}: MEAN must be >= 1 and STD >= 0")
        return cls(kind, *values)

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.gauss(self.a, self.b)))

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{int(self.a)}"
        if self.kind == "uniform":
            return f"uniform:{int(self.a)}:{int(self.b)}"
        return f"normal:{self.a:g}:{self.b:g}"


@dataclass(frozen=True)
class WorkItem:
    """One request of the benchmark: its prompt (token ids) and how many tokens to generate."""

    index: int
    prompt_token_ids: list[int]
    max_tokens: int


def make_workload(n: int, prompt_len: LengthDist, output_len: LengthDist, shared_prefix_tokens: int = 0,
                  seed: int = 0) -> list[WorkItem]:
    """`n` requests; each prompt is the shared prefix then `prompt_len` drawn tokens."""
    if n < 1:
        raise ValueError(f"num_requests={n}: allowed: >= 1")
    if shared_prefix_tokens < 0:
        raise ValueError(f"shared_prefix_tokens={shared_prefix_tokens}: allowed: >= 0")
    rng = random.Random(seed)
    low, high = TOKEN_ID_RANGE
    prefix = [rng.randrange(low, high) for _ in range(shared_prefix_tokens)]
    items = []
    for i in range(n):
        body = [rng.randrange(low, high) for _ in range(prompt_len.sample(rng))]
        items.append(WorkItem(i, prefix + body, output_len.sample(rng)))
    return items


def arrival_times(n: int, rate: float, seed: int = 0) -> list[float]:
    """Seconds after the start at which each of `n` requests is sent: a Poisson process of `rate` requests
    per second (exponential gaps, the first request at 0); `rate` = inf sends them all at once."""
    if not rate > 0:
        raise ValueError(f"rate={rate}: allowed: requests per second > 0, or inf (all at once)")
    if rate == float("inf"):
        return [0.0] * n
    rng = random.Random(seed ^ 0x5EED)  # not the workload's stream: the same prompts at any rate
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate)
    return times
