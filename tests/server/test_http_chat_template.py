"""Chat templates render as transformers' `apply_chat_template` renders them (the reference), refuse what the
template refuses, and say clearly when a checkpoint has none."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoTokenizer

from moe_runtime.server.http.admission import normalize_messages
from moe_runtime.server.http.chat_template import ChatTemplateError, load_chat_template
from moe_runtime.server.http.errors import ApiError
from moe_runtime.tokenizer import Tokenizer

# Exercises what Hub templates use: a system message, namespace(), loop controls, tojson, the special
# tokens, a {% generation %} block, trim_blocks/lstrip_blocks whitespace handling.
RICH_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(system='') %}
{% for m in messages %}
    {% if m['role'] == 'system' %}{% set ns.system = m['content'] %}{% continue %}{% endif %}
    {% if m['role'] == 'user' %}<|user|>{{ ns.system }} {{ m['content'] | trim }}{{ eos_token }}
    {% else %}<|assistant|>{% generation %}{{ m['content'] }}{% endgeneration %}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}<|assistant|>{% endif %}{{ {'n': messages | length, 'é': unk_token} | tojson }}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! <b>"},
     {"role": "user", "content": "  Tell me about experts  "}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why MoE?"}],
]


def _checkpoint(src, dst, template):
    dst.mkdir()
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return dst


@pytest.mark.parametrize("template", ["mixtral", "rich"])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_renders_and_tokenizes_like_transformers(chat_model_dir, tiny_model_dir, tmp_path, template, conversation):
    model_dir = chat_model_dir if template == "mixtral" else _checkpoint(tiny_model_dir, tmp_path / "rich",
                                                                         RICH_TEMPLATE)
    messages = CONVERSATIONS[conversation]
    reference = AutoTokenizer.from_pretrained(model_dir)
    try:
        expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - the reference refuses it: so must we
        with pytest.raises(ChatTemplateError, match="refused them"):
            load_chat_template(model_dir).render(normalize_messages(messages))
        assert "alternate" in str(e) or "roles" in str(e)
        return
    text = load_chat_template(model_dir).render(normalize_messages(messages))
    assert text == expected
    ids = Tokenizer.from_dir(model_dir).encode(text, add_special_tokens=False)
    assert ids == reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                return_dict=False)
    assert ids[0] == 1 and ids.count(1) == 1  # the template's BOS, once


def test_raise_exception_is_a_clear_refusal(chat_model_dir):
    template = load_chat_template(chat_model_dir)
    with pytest.raises(ChatTemplateError) as err:
        template.render([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])
    assert "Conversation roles must alternate" in str(err.value) and "tokenizer_config.json" in str(err.value)


def test_no_template_names_the_files(tiny_model_dir):
    with pytest.raises(ChatTemplateError) as err:
        load_chat_template(tiny_model_dir)
    message = str(err.value)
    assert "no chat template" in message and "chat_template.jinja" in message and "/v1/completions" in message


def test_jinja_file_wins_and_named_templates_use_default(tiny_model_dir, tmp_path):
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "{{ messages[0].content }}!"}]
    model_dir = _checkpoint(tiny_model_dir, tmp_path / "named", named)
    assert load_chat_template(model_dir).render([{"role": "user", "content": "hi"}]) == "hi!"
    (model_dir / "chat_template.jinja").write_text("[{{ messages | length }}]")
    assert load_chat_template(model_dir).render([{"role": "user", "content": "hi"}]) == "[1]"
    no_default = _checkpoint(tiny_model_dir, tmp_path / "no-default", named[:1])
    with pytest.raises(ChatTemplateError, match="none named 'default'"):
        load_chat_template(no_default)


def test_broken_template_and_sandbox(tiny_model_dir, tmp_path):
    with pytest.raises(ChatTemplateError, match="does not compile"):
        load_chat_template(_checkpoint(tiny_model_dir, tmp_path / "broken", "{% for m in messages %}"))
    escape = "{{ messages.__class__.__mro__ }}"  # reaching Python internals: the sandbox refuses
    with pytest.raises(ChatTemplateError, match="refused them"):
        load_chat_template(_checkpoint(tiny_model_dir, tmp_path / "escape", escape)).render(
            [{"role": "user", "content": "x"}])
    setter = "{% set ns = namespace(_hidden=1) %}{{ ns }}"
    with pytest.raises(ChatTemplateError, match="underscore"):
        load_chat_template(_checkpoint(tiny_model_dir, tmp_path / "ns", setter)).render(
            [{"role": "user", "content": "x"}])


def test_messages_normalized_like_openai_servers():
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
              "name": None}]
    assert normalize_messages(parts) == [{"role": "user", "content": "a\nb"}]
    for bad, where in [([], "messages=[]"), ([{"content": "x"}], "messages[0].role=None"),
                       (["hi"], "messages[0]='hi'"),
                       ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
                        "messages[0].content[0].type='image_url'"),
                       ([{"role": "user", "content": 5}], "messages[0].content=5")]:
        with pytest.raises(ApiError) as err:
            normalize_messages(bad)
        assert err.value.status == 400 and err.value.message.startswith(where), err.value.message
