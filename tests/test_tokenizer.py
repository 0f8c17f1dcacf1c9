"""Tokenizer: round trips (non-ASCII included), BOS handling, agreement with transformers' AutoTokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from moe_runtime.tokenizer import Tokenizer

TEXTS = (
    "Hello, world!",
    "café naïve Straße über",
    "日本語のテキストと中文 and 한국어",
    "emoji 🙂🚀 and math ∑∫√ and Ωμέγα",
    "  leading spaces\nnew lines\ttabs  ",
    "",
)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return Tokenizer.from_dir(tiny_model_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id == 1
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS)
def test_matches_transformers(tok, tiny_model_dir, text):
    ref = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.encode(text) == ref(text)["input_ids"]
    assert tok.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"]


def test_special_tokens_and_vocab(tok):
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.vocab_size == 2048
    assert tok.decode([1, *tok.encode("hi", add_special_tokens=False), 2]) == "hi"
    assert tok.decode([1, 2], skip_special_tokens=False) == "<s></s>"


def test_add_bos_false(tiny_model_dir, tmp_path):
    import json
    import shutil

    d = shutil.copytree(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": False}))
    assert Tokenizer.from_dir(d).encode("hi")[0] != 1
