"""Engine outputs in OpenAI's response shapes: completions and chat completions, whole or as stream chunks.

One `ResponseBuilder` per request turns the engine's `RequestOutput` deltas into the body of a non-streamed
response (`final`) or one chunk per delta (`chunk`), so both paths format the same way:

- `text_completion`: `choices[0].text`; logprobs as `{tokens, token_logprobs, top_logprobs, text_offset}`.
- `chat.completion`: `choices[0].message = {role: assistant, content}`; streamed as `chat.completion.chunk`
  with `delta` (the first one carries the role); logprobs as `{content: [{token, logprob, bytes,
  top_logprobs: [...]}]}`.
- finish reasons: the engine's "eos" and "stop" (stop string or stop token) are OpenAI's "stop", "length"
  stays. `usage` counts prompt and completion tokens.

A token's text is what the tokenizer decodes for it alone (special tokens included); `bytes` is its UTF-8,
or null when the token is part of a character split across tokens (its text alone is not valid UTF-8).
"""

from __future__ import annotations

import functools
import time
from typing import Any

from moe_runtime.engine.outputs import RequestOutput, TokenLogprob
from moe_runtime.server.http.admission import Kind

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
REPLACEMENT = "\ufffd"
TOKEN_TEXT_CACHE = 1 << 16  # token ids whose text a server keeps (~5 MB at most)


class TokenTexts:
    """Token id -> its text, cached: logprobs name up to 21 tokens per generated token."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self.text = functools.lru_cache(maxsize=TOKEN_TEXT_CACHE)(self._decode)

    def _decode(self, token_id: int) -> str:
        if self._tokenizer is None:  # a checkpoint without a tokenizer: ids only
            return f"token_id:{token_id}"
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    def bytes_of(self, token_id: int) -> list[int] | None:
        text = self.text(token_id)
        return None if REPLACEMENT in text else list(text.encode())


class ResponseBuilder:
    """Formats one request's outputs; keeps the running state a stream needs (role sent, text offset)."""

    def __init__(self, kind: Kind, request_id: str, model_id: str, texts: TokenTexts, include_usage: bool = False):
        self.kind, self.request_id, self.model_id, self.texts = kind, request_id, model_id, texts
        self.include_usage = include_usage
        self.created = int(time.time())
        self._role_sent = False
        self._offset = 0  # characters of completion text before the next token (completions' text_offset)

    # -- whole responses -----------------------------------------------------------------------------------
    def final(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        """The non-streamed body from every output of the request (the last one finished)."""
        last = outputs[-1]
        lps = [lp for out in outputs for lp in out.logprobs or ()] if last.logprobs is not None else None
        choice: dict[str, Any] = {"index": 0, "logprobs": self._logprobs(lps),
                                  "finish_reason": FINISH_REASONS.get(last.finish_reason)}
        if self.kind == "completion":
            choice["text"] = last.text
        else:
            choice["message"] = {"role": "assistant", "content": last.text}
        return {**self._head(), "choices": [choice], "usage": usage(last)}

    # -- stream chunks -------------------------------------------------------------------------------------
    def chunk(self, out: RequestOutput) -> dict[str, Any]:
        """One streamed chunk for one output delta."""
        choice: dict[str, Any] = {"index": 0, "logprobs": self._logprobs(out.logprobs),
                                  "finish_reason": FINISH_REASONS.get(out.finish_reason) if out.finished else None}
        if self.kind == "completion":
            choice["text"] = out.new_text
        else:
            delta: dict[str, Any] = {} if self._role_sent else {"role": "assistant"}
            self._role_sent = True
            if out.new_text or not out.finished:
                delta["content"] = out.new_text
            choice["delta"] = delta
        body = {**self._head(chunk=True), "choices": [choice]}
        if self.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, last: RequestOutput) -> dict[str, Any]:
        """The chunk `stream_options.include_usage` asks for after the last one: no choices, the usage."""
        return {**self._head(chunk=True), "choices": [], "usage": usage(last)}

    # -- parts ---------------------------------------------------------------------------------------------
    def _head(self, chunk: bool = False) -> dict[str, Any]:
        kind = "text_completion" if self.kind == "completion" else "chat.completion.chunk" if chunk else \
            "chat.completion"
        return {"id": self.request_id, "object": kind, "created": self.created, "model": self.model_id}

    def _logprobs(self, lps: list[TokenLogprob] | None) -> dict[str, Any] | None:
        if lps is None:
            return None
        text = self.texts.text
        if self.kind == "chat":
            return {"content": [{"token": text(lp.token_id), "logprob": lp.logprob,
                                 "bytes": self.texts.bytes_of(lp.token_id),
                                 "top_logprobs": [{"token": text(t), "logprob": p, "bytes": self.texts.bytes_of(t)}
                                                  for t, p in lp.top]} for lp in lps]}
        tokens = [text(lp.token_id) for lp in lps]
        offsets = []
        for token in tokens:
            offsets.append(self._offset)
            self._offset += len(token)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{text(t): p for t, p in lp.top} for lp in lps], "text_offset": offsets}


def usage(out: RequestOutput) -> dict[str, int]:
    return {"prompt_tokens": out.num_prompt_tokens, "completion_tokens": out.num_output_tokens,
            "total_tokens": out.num_prompt_tokens + out.num_output_tokens}
