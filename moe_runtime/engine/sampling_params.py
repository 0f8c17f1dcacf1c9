"""How one request wants its tokens chosen and when it stops. Checked once, when the request is added."""

from __future__ import annotations

import math
from dataclasses import dataclass

from moe_runtime.errors import RequestError

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping for one request. `temperature=0` is greedy (top-k/p/min-p then do nothing)."""

    max_tokens: int = 16  # new tokens at most
    temperature: float = 1.0  # 0: greedy
    top_k: int = -1  # keep the k most likely tokens; -1: all
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p; (0, 1]
    min_p: float = 0.0  # drop tokens below min_p * p(most likely); [0, 1]
    seed: int | None = None  # same seed -> same tokens, whatever else shares the batch
    stop: tuple[str, ...] = ()  # stop strings; the match is not part of the output text
    stop_token_ids: tuple[int, ...] = ()  # tokens that finish the request (kept in token_ids)
    ignore_eos: bool = False  # keep going past the checkpoint's EOS token
    logprobs: int | None = None  # None: no logprobs; n: chosen token's logprob plus the top n alternatives

    def __post_init__(self) -> None:
        # Lists from JSON or argparse become tuples, so the params stay hashable and immutable.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, max_model_len: int, vocab_size: int) -> None:
        """Raise `RequestError` naming the first bad field, its value and what is allowed."""
        _check(_is_int(self.max_tokens) and 1 <= self.max_tokens <= max_model_len, "max_tokens", self.max_tokens,
               f"an integer in [1, {max_model_len}] (max_model_len)")
        _check(_is_num(self.temperature) and self.temperature >= 0, "temperature", self.temperature,
               "a number >= 0 (0 is greedy)")
        _check(_is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1), "top_k", self.top_k,
               "-1 (all tokens) or an integer >= 1")
        _check(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        _check(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "a number in [0, 1]")
        _check(self.seed is None or _is_int(self.seed), "seed", self.seed, "an integer or None")
        _check(len(self.stop) <= MAX_STOP_STRINGS, "stop", f"{len(self.stop)} strings",
               f"at most {MAX_STOP_STRINGS} stop strings")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "non-empty strings")
        _check(all(_is_int(t) and 0 <= t < vocab_size for t in self.stop_token_ids), "stop_token_ids",
               self.stop_token_ids, f"token ids in [0, {vocab_size})")
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", self.ignore_eos, "true or false")
        _check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
               "logprobs", self.logprobs, f"None or an integer in [0, {MAX_LOGPROBS}]")


def validate_prompt(prompt_token_ids: list[int], vocab_size: int) -> None:
    """Raise `RequestError` for an empty prompt or a token id outside the vocabulary."""
    if len(prompt_token_ids) == 0:
        raise RequestError("prompt_token_ids: empty; a prompt needs at least one token")
    for i, t in enumerate(prompt_token_ids):
        if not _is_int(t) or not 0 <= t < vocab_size:
            raise RequestError(f"prompt_token_ids[{i}]={t!r}: out of vocabulary; allowed: [0, {vocab_size})")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, field: str, value: object, allowed: str) -> None:
    if not ok:
        raise RequestError(f"{field}={value!r}: invalid; allowed: {allowed}")
