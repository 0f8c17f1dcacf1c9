"""Tokenizer: round trips (non-ASCII included), BOS handling, agreement with transformers' AutoTokenizer."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from transformers import AutoTokenizer

from moe_runtime.tokenizer import Tokenizer, max_token_bytes

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


# (case, tokenizer.json changes, the bound): a bound only where no step of the pipeline can shrink text
BOUND_CASES = (
    ("byte-level BPE", {}, 26),
    ("metaspace normalizer (Mixtral's)", {"normalizer": {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "},
                                                   "content": "\u2581"}]}}, 26),
    ("lowercase", {"normalizer": {"type": "Lowercase"}}, None),
    ("NFKC", {"normalizer": {"type": "NFKC"}}, None),
    ("replace by shorter", {"normalizer": {"type": "Replace", "pattern": {"String": "  "}, "content": " "}}, None),
    ("whitespace split drops spaces", {"pre_tokenizer": {"type": "Whitespace"}}, None),
    ("fused unknowns", {"model": {"unk_token": "<unk>", "fuse_unk": True}}, None),
    ("unknowns one per character", {"model": {"unk_token": "<unk>", "fuse_unk": False}}, 26),
)


@pytest.mark.parametrize(("case", "changes", "bound"), BOUND_CASES, ids=[c[0] for c in BOUND_CASES])
def test_max_token_bytes_only_where_text_cannot_shrink(tiny_model_dir, case, changes, bound):
    spec = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    for key, value in changes.items():
        spec[key] = {**spec[key], **value} if key == "model" else value
    assert max_token_bytes(HFTokenizer.from_str(json.dumps(spec))) == bound


def test_no_text_needs_fewer_tokens_than_the_bound_says(tok):
    """The bound's promise, on the embedded tokenizer: n bytes of text take at least n / max_token_bytes tokens."""
    longest = max(tok.backend.get_vocab(), key=lambda t: len(t.encode()))
    text = tok.decode([tok.backend.token_to_id(longest)])
    for sample in (*TEXTS[:-1], text * 50, "a" * 1000, " " * 1000):
        n = len(tok.encode(sample, add_special_tokens=False))
        assert n >= len(sample.encode()) / tok.max_token_bytes, sample[:20]
