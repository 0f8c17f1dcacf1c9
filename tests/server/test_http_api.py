"""The OpenAI-compatible HTTP API through the official `openai` client: completions and chat, whole and
streamed, with logprobs, stop strings and seeds, token for token what the gRPC path gives for the same
request on the same engine."""

from __future__ import annotations

import openai
import pytest

from moe_runtime.server.http.chat_template import load_chat_template
from moe_runtime.tokenizer import Tokenizer

PROMPT = "The experts of a mixture"
FIXED = {"ignore_eos": True}  # vLLM's extension: fixed-length outputs, whenever the seeded model emits EOS


@pytest.fixture(scope="module")
def server(start_server, chat_model_dir):
    with start_server("server.http_port=0", "engine.max_num_seqs=8", model_dir=chat_model_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server, openai_for):
    return openai_for(server)


@pytest.fixture(scope="module")
def model(client):
    """The served model's id (the checkpoint directory's name)."""
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def tokenizer(chat_model_dir):
    return Tokenizer.from_dir(chat_model_dir)


def _grpc(stub_for, server, request_for, prompt, **sampling):
    return stub_for(server).Generate(request_for(prompt, **sampling), timeout=30)


def _token_texts(tokenizer, ids):
    return [tokenizer.decode([i], skip_special_tokens=False) for i in ids]


def test_completion_is_the_grpc_result_token_for_token(server, client, model, stub_for, request_for, tokenizer):
    ref = _grpc(stub_for, server, request_for, PROMPT, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    got = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3,
                                    extra_body=FIXED)
    choice = got.choices[0]
    assert choice.text == ref.text and choice.finish_reason == "length"
    assert choice.logprobs.tokens == _token_texts(tokenizer, ref.token_ids)
    assert choice.logprobs.token_logprobs == pytest.approx([lp.logprob for lp in ref.logprobs], abs=1e-5)
    for top, ref_lp in zip(choice.logprobs.top_logprobs, ref.logprobs, strict=True):
        assert list(top) == _token_texts(tokenizer, [t.token_id for t in ref_lp.top])
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (ref.usage.prompt_tokens, 12)
    assert got.usage.total_tokens == ref.usage.prompt_tokens + 12 and got.id.startswith("cmpl-")

    stream = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3,
                                            stream=True, extra_body=FIXED))
    assert "".join(c.choices[0].text for c in stream) == ref.text
    assert [t for c in stream for t in c.choices[0].logprobs.tokens] == choice.logprobs.tokens
    offsets = [o for c in stream for o in c.choices[0].logprobs.text_offset]
    assert offsets == choice.logprobs.text_offset and offsets[0] == 0
    assert [c.choices[0].finish_reason for c in stream][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in stream[:-1]) and len({c.id for c in stream}) == 1


def test_prompt_as_token_ids_and_a_batch_of_one(server, client, model, stub_for, request_for, tokenizer):
    ids = tokenizer.encode(PROMPT)
    ref = _grpc(stub_for, server, request_for, ids, max_tokens=6, temperature=0)
    for prompt in (ids, [ids], [PROMPT]):
        got = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0, extra_body=FIXED)
        assert got.choices[0].text == ref.text
    # `model` may be left out (null): one model is served
    unnamed = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0,
                                        extra_body=FIXED)
    assert unnamed.choices[0].text == ref.text and unnamed.model == model


def test_chat_is_the_template_then_the_grpc_result(server, client, model, stub_for, request_for, chat_model_dir,
                                                   tokenizer):
    messages = [{"role": "user", "content": "Route this token"}, {"role": "assistant", "content": "Done."},
                {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "text", "text": "this?"}]}]
    text = load_chat_template(chat_model_dir).render([*messages[:2], {"role": "user", "content": "And\nthis?"}])
    ids = tokenizer.encode(text, add_special_tokens=False)
    ref = _grpc(stub_for, server, request_for, ids, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2)
    got = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=10, temperature=0,
                                         logprobs=True, top_logprobs=2, extra_body=FIXED)
    choice = got.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ref.text
    assert choice.finish_reason == "length" and got.object == "chat.completion" and got.id.startswith("chatcmpl-")
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == 10
    content = choice.logprobs.content
    assert [c.token for c in content] == _token_texts(tokenizer, ref.token_ids)
    assert [c.logprob for c in content] == pytest.approx([lp.logprob for lp in ref.logprobs], abs=1e-5)
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    assert all(c.bytes is None or bytes(c.bytes).decode() == c.token for c in content)

    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body=FIXED))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_errors_name_chat_fields(server, client, model):
    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=hi, logprobs=True, top_logprobs=30)
    assert err.value.param == "top_logprobs" and err.value.body["message"].startswith("top_logprobs=30: invalid")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=hi, max_completion_tokens=0)
    assert err.value.param == "max_completion_tokens" and err.value.body["message"].startswith("max_completion_tokens=0")
    with pytest.raises(openai.BadRequestError) as err:  # the template's raise_exception
        client.chat.completions.create(model=model, messages=[{"role": "system", "content": "x"}, *hi])
    assert err.value.param == "messages" and err.value.code == "chat_template_error"
    assert "Conversation roles must alternate" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:  # the rendered prompt is checked as a prompt is
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "word " * 40_000}])
    assert err.value.param == "messages" and "longer than the context" in err.value.message


def test_stop_strings_end_the_text_before_them(server, client, model):
    full = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0,
                                     extra_body=FIXED).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert len(stop) == 3
    for stream in (False, True):
        result = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop, "@@@"],
                                           stream=stream, extra_body=FIXED)
        chunks = list(result) if stream else [result]
        text = "".join(c.choices[0].text for c in chunks)
        assert text == full[:full.index(stop)] and chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_the_grpc_result(server, client, model, stub_for, request_for):
    ref = _grpc(stub_for, server, request_for, PROMPT, max_tokens=16, temperature=0.9, top_p=0.9, seed=1234)
    texts = [client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0.9, top_p=0.9, seed=1234,
                                       extra_body=FIXED).choices[0].text for _ in range(2)]
    assert texts == [ref.text, ref.text]
    other = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0.9, top_p=0.9, seed=99,
                                      extra_body=FIXED).choices[0].text
    assert other != ref.text


def test_models_and_health(server, client):
    import httpx2

    models = client.models.list().data
    assert [m.id for m in models] == [server.app.cfg.model.path.rstrip("/").rsplit("/", 1)[-1]]
    assert models[0].owned_by == "moe-runtime" and models[0].model_extra["max_model_len"] > 0
    assert client.models.retrieve(models[0].id).id == models[0].id
    health = httpx2.get(server.http_url + "/health", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "serving"}
    finished = server.app.telemetry.finished_counts()
    assert finished.get("length", 0) >= 1  # HTTP requests count in the same metrics as gRPC ones
