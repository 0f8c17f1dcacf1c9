"""Request bodies of `/v1/completions` and `/v1/chat/completions`: their JSON shape, and what the engine takes.

Only the shape is checked here: JSON types (strict: `"5"` is not a number, `1.0` is not an integer),
unknown fields (refused, naming the field and the allowed ones, as OpenAI does), the fields whose shape is a
union (`prompt`, `stop`, a message's `content`), and the OpenAI options this server does not implement, each
accepted only at its neutral value (`n`=1, `echo`=false, penalties 0, ...). Values are the engine's to check,
once (`SamplingParams.validate`, `LLMEngine.make_request`): `to_sampling_params` passes them on as sent.

Beyond OpenAI's fields, these take vLLM's names for the engine's own options: `top_k`, `min_p`,
`ignore_eos`, `stop_token_ids`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from moe_runtime.engine.sampling_params import SamplingParams
from moe_runtime.server.http.errors import ApiError, invalid

NEUTRAL = {"n": 1, "best_of": 1, "echo": False, "presence_penalty": 0, "frequency_penalty": 0, "suffix": None,
           "logit_bias": {}}  # OpenAI options this server does not implement: only their neutral value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False  # one more chunk before [DONE], with `choices: []` and the usage


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None  # None: the served model
    max_tokens: int | None = None  # None: the engine's default (16, or what the context leaves)
    temperature: float | None = None
    top_p: float | None = None
    stop: Any = None  # a string or a list of strings
    seed: int | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # the caller's end-user id; accepted and not used
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's names for the engine's options
    top_k: int | None = None
    min_p: float | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None

    def check_shape(self) -> None:
        """The wire-level rules: neutral values of what is not implemented, `stream_options` with `stream`."""
        for name, neutral in NEUTRAL.items():
            value = getattr(self, name, None)
            if value is not None and value != neutral:
                raise invalid(name, value, f"not supported by this server; allowed: {neutral!r} or unset"
                              + ("; send separate requests for more choices" if name in ("n", "best_of") else ""),
                              "unsupported_value")
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options", self.stream_options.model_dump(), "allowed only with stream=true")

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        if isinstance(self.stop, str):
            return (self.stop,)
        if isinstance(self.stop, list) and all(isinstance(s, str) for s in self.stop):
            return tuple(self.stop)
        raise invalid("stop", self.stop, "a string or a list of strings")

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """The engine's params; fields left unset take the engine's defaults."""
        given = {"max_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                 "seed": self.seed, "top_k": self.top_k, "min_p": self.min_p, "ignore_eos": self.ignore_eos}
        return SamplingParams(**{k: v for k, v in given.items() if v is not None}, stop=self.stop_strings(),
                              stop_token_ids=tuple(self.stop_token_ids or ()), logprobs=logprobs)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Common):
    prompt: Any  # text, token ids, or a list of one of either
    logprobs: int | None = None  # the chosen token's logprob and this many alternatives
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    def prompt_input(self) -> str | list[int]:
        """The one prompt, as text or token ids (the engine checks the ids)."""
        p = self.prompt
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]  # a batch of one
        if isinstance(p, str):
            return p
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return p
        if isinstance(p, list) and len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
            raise invalid("prompt", f"<a batch of {len(p)} prompts>", "one prompt per request; send one request "
                          "each")
        raise invalid("prompt", p, "a string, or a non-empty list of token ids (integers)")

    def engine_names(self) -> dict[str, str]:
        return {"prompt_token_ids": "prompt"}


class ChatCompletionRequest(_Common):
    messages: list[Any]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None  # logprobs of the chosen tokens
    top_logprobs: int | None = None  # and this many alternatives (needs logprobs=true)

    def check_shape(self) -> None:
        super().check_shape()
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise invalid("max_completion_tokens", self.max_completion_tokens,
                          f"max_tokens={self.max_tokens} is set too; send one of them")
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs", self.top_logprobs, "needs logprobs=true")

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def engine_names(self) -> dict[str, str]:
        return {"prompt": "messages", "prompt_token_ids": "messages", "logprobs": "top_logprobs",
                "max_tokens": "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"}


def parse(model: type[_Common], body: bytes) -> Any:
    """`model` from a JSON body, shape-checked; `ApiError` 400 naming the first bad field otherwise."""
    try:
        request = model.model_validate_json(body)
    except ValidationError as e:
        raise _shape_error(model, e) from None
    request.check_shape()
    return request


def _shape_error(model: type[_Common], e: ValidationError) -> ApiError:
    err = e.errors(include_url=False)[0]
    kind, loc = err["type"], err["loc"]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    if kind == "json_invalid":
        return ApiError(400, f"body: not valid JSON ({err['msg'].removeprefix('Invalid JSON: ')}); send a JSON "
                             "object", None, "invalid_json")
    if kind == "model_type" and param is None:
        return ApiError(400, "body: not a JSON object; send one, e.g. {\"prompt\": ...}", None, "invalid_json")
    if kind == "extra_forbidden":
        allowed = sorted(model.model_fields)
        return ApiError(400, f"{param}: unknown field; allowed: {', '.join(allowed)}", param, "unknown_field")
    if kind == "missing":
        return ApiError(400, f"{param}: missing; this endpoint needs it", param, "missing_field")
    expected = err["msg"][0].lower() + err["msg"][1:]  # pydantic's "Input should be a valid integer"
    return invalid(param or "body", err.get("input"), "must be " + expected.removeprefix("input should be "),
                   "invalid_type")
