"""From an HTTP request body to what the engine takes: parse, check the model, render the chat, tokenize.

Runs in a worker thread (`asyncio.to_thread`), never on the event loop that every stream shares: parsing a
4 MiB body, rendering a chat template and tokenizing take milliseconds to seconds (the tokenizer releases
the GIL; text that cannot fit the context is refused before tokenizing, by `LLMEngine.encode`). Every
refusal is an `ApiError` naming the request's field.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from moe_runtime.engine.sampling_params import SamplingParams
from moe_runtime.errors import MissingTokenizerError, RequestError
from moe_runtime.server.http.chat_template import ChatTemplate, ChatTemplateError
from moe_runtime.server.http.errors import ApiError, engine_error, invalid
from moe_runtime.server.http.schemas import ChatCompletionRequest, CompletionRequest, parse

Kind = Literal["completion", "chat"]
Encode = Callable[[str, bool], list[int]]  # AsyncEngine.encode(text, add_special_tokens)


@dataclass(frozen=True)
class Admitted:
    """A request ready for `AsyncEngine.generate` (which still checks its values: `names` renames the
    engine's fields in those errors to this request's)."""

    kind: Kind
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    names: dict[str, str] = field(default_factory=dict)


def admit(kind: Kind, body: bytes, model_id: str, encode: Encode,
          chat_template: ChatTemplate | ChatTemplateError) -> Admitted:
    """Parse and prepare one request. `chat_template`: the checkpoint's, or why it has none."""
    request = parse(CompletionRequest if kind == "completion" else ChatCompletionRequest, body)
    if request.model is not None and request.model != model_id:
        raise ApiError(404, f"model={request.model!r}: not served here; allowed: {model_id!r} (GET /v1/models)",
                       "model", "model_not_found")
    names = request.engine_names()
    try:
        if kind == "completion":
            prompt = request.prompt_input()
            ids = encode(prompt, True) if isinstance(prompt, str) else prompt
            params = request.sampling_params(request.max_tokens, request.logprobs)
        else:
            if isinstance(chat_template, ChatTemplateError):
                raise ApiError(400, str(chat_template), "messages", "chat_template_missing")
            try:
                text = chat_template.render(normalize_messages(request.messages))
            except ChatTemplateError as e:
                raise ApiError(400, str(e), "messages", "chat_template_error") from None
            ids = encode(text, False)  # the template wrote its own BOS
            params = request.sampling_params(request.completion_limit, request.engine_logprobs)
    except (RequestError, MissingTokenizerError) as e:
        raise engine_error(e, names) from None
    prefix = "cmpl" if kind == "completion" else "chatcmpl"
    return Admitted(kind, f"{prefix}-{uuid.uuid4().hex}", ids, params, request.stream, request.include_usage, names)


def normalize_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """OpenAI messages as chat templates read them: dicts with a string `role`, `content` a string (text
    parts joined by newlines, as vLLM does), keys whose value is null dropped (as transformers does)."""
    if not messages:
        raise invalid("messages", messages, "at least one message, e.g. [{\"role\": \"user\", \"content\": \"Hi\"}]")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}]", m, "an object with role and content")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise invalid(f"messages[{i}].role", m.get("role"), "a non-empty string, e.g. 'system', 'user', "
                          "'assistant'")
        m = {k: v for k, v in m.items() if v is not None}
        content = m.get("content")
        if isinstance(content, list):
            m["content"] = "\n".join(_text_part(i, j, part) for j, part in enumerate(content))
        elif content is not None and not isinstance(content, str):
            raise invalid(f"messages[{i}].content", content, "a string, or a list of text parts")
        out.append(m)
    return out


def _text_part(i: int, j: int, part: Any) -> str:
    where = f"messages[{i}].content[{j}]"
    if not isinstance(part, dict) or part.get("type") != "text":
        kind = part.get("type") if isinstance(part, dict) else part
        raise invalid(f"{where}.type", kind, "this model reads text only; allowed: 'text'")
    if not isinstance(part.get("text"), str):
        raise invalid(f"{where}.text", part.get("text"), "a string")
    return part["text"]
