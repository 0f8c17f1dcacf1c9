"""How one request wants its tokens chosen and when it stops: the one place a request's fields are checked.

Every transport (offline `generate`, gRPC) builds a `SamplingParams` and the engine validates it once, when
the request is made (`LLMEngine.make_request`). Each error is a `RequestError` whose message starts with
the field, then its value, the problem and what is allowed; `RequestError.field` names the field, so the
gRPC server can point at it in its own message shape (`sampling_params.top_p=...`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from moe_runtime.errors import RequestError

DEFAULT_MAX_TOKENS = 16  # new tokens when a request does not say (fewer if the context has less room)
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # characters per stop string
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping for one request. `temperature=0` is greedy (top-k/p/min-p then do nothing)."""

    max_tokens: int | None = None  # new tokens at most; None: DEFAULT_MAX_TOKENS, or what the context leaves
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

    def resolved(self, max_model_len: int, prompt_len: int) -> SamplingParams:
        """These params for a prompt of `prompt_len` tokens: an unset max_tokens becomes DEFAULT_MAX_TOKENS,
        or the room the context leaves when that is less (at least 1, so validation can name the field)."""
        if self.max_tokens is not None:
            return self
        return dataclasses.replace(self, max_tokens=max(1, min(DEFAULT_MAX_TOKENS, max_model_len - prompt_len)))

    def validate(self, max_model_len: int, vocab_size: int, prompt_len: int) -> None:
        """Raise `RequestError` naming the first bad field, its value and what is allowed. max_tokens must
        be resolved (`resolved`)."""
        room = max_model_len - prompt_len
        _check(_is_int(self.max_tokens) and self.max_tokens > 0, "max_tokens", self.max_tokens,
               "must be > 0", f"an integer in [1, {max(room, 1)}] (unset: {DEFAULT_MAX_TOKENS})")
        _check(self.max_tokens <= room, "max_tokens", self.max_tokens,
               f"prompt ({prompt_len} tokens) + max_tokens must be <= the context ({max_model_len})",
               f"at most {room} here")
        _check(_is_num(self.temperature) and self.temperature >= 0, "temperature", self.temperature,
               "invalid", "a finite number >= 0 (0 is greedy)")
        _check(_is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1), "top_k", self.top_k,
               "invalid", "an integer, -1 (off) or >= 1")
        _check(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "invalid", "a number in (0, 1]")
        _check(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "invalid", "a number in [0, 1]")
        _check(self.seed is None or _is_int(self.seed), "seed", self.seed, "invalid", "an integer or unset")
        _check(len(self.stop) <= MAX_STOP_STRINGS, "stop", f"<{len(self.stop)} strings>", "too many",
               f"at most {MAX_STOP_STRINGS} stop strings")
        for i, s in enumerate(self.stop):
            _check(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS, f"stop[{i}]", s, "invalid",
                   f"a string of 1 to {MAX_STOP_CHARS} characters")
        _check(len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids",
               f"<{len(self.stop_token_ids)} ids>", "too many", f"at most {MAX_STOP_TOKEN_IDS} ids")
        for i, t in enumerate(self.stop_token_ids):
            _check(_is_int(t) and 0 <= t < vocab_size, f"stop_token_ids[{i}]", t, "out of vocabulary",
                   f"token ids in [0, {vocab_size})")
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", self.ignore_eos, "invalid", "true or false")
        _check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
               "logprobs", self.logprobs, "invalid", f"unset or an integer in [0, {MAX_LOGPROBS}]")


def validate_prompt(prompt_token_ids: list[int], vocab_size: int, max_model_len: int) -> None:
    """Raise `RequestError` for an empty prompt, a token id outside the vocabulary, or a prompt that leaves
    no room for output in the context."""
    if len(prompt_token_ids) == 0:
        raise RequestError("prompt_token_ids: empty; a prompt needs at least one token", "prompt_token_ids")
    # The length first: it is O(1), and a prompt of millions of ids must not cost a pass over them.
    _check(len(prompt_token_ids) < max_model_len, "prompt", f"<{len(prompt_token_ids)} tokens>",
           "longer than the context", f"at most {max_model_len - 1} tokens leave room for output")
    for i, t in enumerate(prompt_token_ids):
        _check(_is_int(t) and 0 <= t < vocab_size, f"prompt_token_ids[{i}]", t, "out of vocabulary",
               f"[0, {vocab_size})")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, field: str, value: object, problem: str, allowed: str) -> None:
    if not ok:
        raise RequestError(f"{field}={value!r}: {problem}; allowed: {allowed}", field.split("[")[0])
