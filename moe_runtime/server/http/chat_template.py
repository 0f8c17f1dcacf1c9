"""A checkpoint's chat template, rendered the way transformers' `apply_chat_template` renders it.

Where the template comes from (transformers' order): `chat_template.jinja` beside the tokenizer (what
`save_pretrained` writes since transformers 4.50), else `chat_template` in `tokenizer_config.json`: a
string, or a list of named templates of which "default" is used.

How it renders (transformers `utils/chat_template_utils.py`, `_cached_compile_jinja_template` and
`render_jinja_template`): jinja2's `ImmutableSandboxedEnvironment` (templates from a hub are untrusted code)
with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension and a `{% generation %}` block that
renders its body; `raise_exception(message)`, `strftime_now(format)`, a `tojson` that does not escape HTML,
a `dict` constructor and a `namespace` that refuses underscore names; and the variables `messages`,
`add_generation_prompt` (always true here: the model answers next), `tools` and `documents` (None), plus the
tokenizer's special tokens (`bos_token`, `eos_token`, ... from tokenizer_config.json). The rendered text
already holds the template's BOS, so it is tokenized without adding special tokens (transformers tokenizes
it with `add_special_tokens=False` too). As in transformers by default, special-token text inside a user's
message is tokenized as that special token.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
                      "additional_special_tokens")


class ChatTemplateError(Exception):
    """The checkpoint has no usable chat template, or the template refused the messages
    (`raise_exception` in the template, or an error while rendering). The message says which."""


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: marks the assistant's tokens for training masks in
    transformers; serving only needs the text, so it renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """jinja's `namespace()`, refusing underscore-prefixed attributes (no reaching CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=lambda *a, **kw: dict(*a, **kw), namespace=_Namespace)
    return env


class ChatTemplate:
    """A compiled template and the special tokens it is rendered with. `origin` names where it came from."""

    def __init__(self, source: str, origin: str, special_tokens: dict[str, Any]):
        self.origin = origin
        self.special_tokens = special_tokens
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ChatTemplateError(f"the chat template in {origin} does not compile (line {e.lineno}: "
                                    f"{e.message}); fix the template, or use /v1/completions") from None

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text for `messages` (OpenAI's shape, normalized by the caller), ready for the model to
        answer. `ChatTemplateError` when the template refuses them."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=True, tools=None,
                                         documents=None, **self.special_tokens)
        except jinja2.exceptions.TemplateError as e:  # raise_exception(...), undefined names, sandbox refusals
            raise ChatTemplateError(f"messages: the chat template ({self.origin}) refused them: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(f"messages: the chat template ({self.origin}) failed on them: "
                                    f"{type(e).__name__}: {e}") from None


def load_chat_template(model_dir: str | Path) -> ChatTemplate:
    """The checkpoint's chat template. `ChatTemplateError` naming the files looked at when it has none, or
    when it does not compile."""
    model_dir = Path(model_dir)
    config_path = model_dir / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
    except (OSError, json.JSONDecodeError) as e:
        raise ChatTemplateError(f"{config_path}: cannot read it ({e}); the chat template and special tokens "
                                "come from it") from None
    special = {key: _token_text(config[key]) for key in SPECIAL_TOKEN_KEYS if config.get(key) is not None}
    template_path = model_dir / TEMPLATE_FILE
    if template_path.exists():
        return ChatTemplate(template_path.read_text(), str(template_path), special)
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
        if source is None:
            raise ChatTemplateError(f"{config_path}: chat_template holds templates named {sorted(map(str, named))} "
                                    "but none named 'default', the one /v1/chat/completions uses")
    if not isinstance(source, str) or not source:
        raise ChatTemplateError(f"this checkpoint has no chat template (neither {template_path} nor a chat_template "
                                f"in {config_path}); use /v1/completions with a prompt, or add a template to the "
                                "checkpoint")
    return ChatTemplate(source, f"{config_path}:chat_template", special)


def _token_text(token: Any) -> Any:
    """A special token as templates see it: its text (older configs store AddedToken dicts)."""
    if isinstance(token, dict):
        return token.get("content")
    if isinstance(token, list):
        return [_token_text(t) for t in token]
    return token
