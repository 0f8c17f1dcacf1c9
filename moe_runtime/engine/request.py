"""One request's state on the scheduler side: its tokens, how many are computed, and when it stops.

Tokens owed = `num_tokens - num_computed_tokens`: a new request owes its whole prompt, a running one owes
the token sampled last step, a preempted one owes everything again (recompute). There is no prefill or
decode flag; a step that computes a request's last owed token samples its next one.
"""

from __future__ import annotations

import enum
import time

from moe_runtime.engine.detokenizer import IncrementalDetokenizer
from moe_runtime.engine.outputs import RequestMetrics, RequestOutput, TokenLogprob
from moe_runtime.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: tuple[int, ...] = (),
        detokenizer: IncrementalDetokenizer | None = None,
        max_model_len: int | None = None,
    ):
        self.request_id = request_id
        self.params = params
        self.num_prompt_tokens = len(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)  # prompt then generated tokens
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None
        self.metrics = RequestMetrics(arrival_time=time.monotonic())
        self._eos = () if params.ignore_eos else eos_token_ids
        self._max_len = max_model_len
        self._detok = detokenizer
        self._num_emitted = 0  # generated tokens already handed out in a RequestOutput
        self._logprobs: list[TokenLogprob] = []  # not yet handed out

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_tokens_owed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def max_num_tokens(self) -> int:
        """Tokens this request may ever hold in the KV cache (the last sampled token is never cached): it
        stops at max_tokens outputs or at the context length, whichever comes first."""
        most = self.num_prompt_tokens + self.params.max_tokens - 1
        return most if self._max_len is None else min(most, self._max_len - 1)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token_id: int, logprob: TokenLogprob | None, now: float) -> None:
        """Record a sampled token and finish the request if it hit a stop condition."""
        self.token_ids.append(token_id)
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = now
        if logprob is not None:
            self._logprobs.append(logprob)
        hit_stop_string = self._detok is not None and self._detok.append(token_id)
        if hit_stop_string or token_id in self.params.stop_token_ids:
            self.finish("stop", now)
        elif token_id in self._eos:
            self.finish("eos", now)
        elif self.num_output_tokens >= self.params.max_tokens or (
            self._max_len is not None and self.num_tokens >= self._max_len
        ):
            self.finish("length", now)

    def finish(self, reason: str, now: float | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.metrics.finish_time = time.monotonic() if now is None else now

    def make_output(self) -> RequestOutput:
        """The delta since the previous output, plus the totals so far."""
        outputs = self.token_ids[self.num_prompt_tokens :]
        new_ids = outputs[self._num_emitted :]
        self._num_emitted = len(outputs)
        logprobs = None
        if self.params.logprobs is not None:
            logprobs, self._logprobs = self._logprobs, []
        return RequestOutput(
            request_id=self.request_id,
            new_token_ids=new_ids,
            new_text=self._detok.take_delta(self.finished) if self._detok is not None else "",
            token_ids=outputs,
            text=self._detok.emitted_text if self._detok is not None else "",
            finished=self.finished,
            finish_reason=self.finish_reason,
            logprobs=logprobs,
            num_prompt_tokens=self.num_prompt_tokens,
            num_output_tokens=len(outputs),
            metrics=self.metrics,
        )
