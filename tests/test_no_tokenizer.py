"""A checkpoint without tokenizer.json (what `save_pretrained` of a model alone writes): token ids in and out
work offline and from the CLI; text is refused with one line naming the missing file. gRPC:
tests/server/test_grpc_no_tokenizer.py."""

from __future__ import annotations

import json
import logging

import pytest

from moe_runtime.cli import main
from moe_runtime.config import load_config
from moe_runtime.engine.llm_engine import LLMEngine
from moe_runtime.engine.sampling_params import SamplingParams
from moe_runtime.errors import MissingTokenizerError

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PROMPT_IDS = [1, 5, 6, 7]


def _engine(model_dir) -> LLMEngine:
    return LLMEngine(load_config(overrides=[f"model.path={model_dir}", "cache.num_blocks=64"]))


def test_token_ids_give_the_same_tokens_and_no_text(no_tokenizer_dir, tiny_model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="moe_runtime.tokenizer"):
        engine = _engine(no_tokenizer_dir)
    assert [r.getMessage().count("tokenizer.json") for r in caplog.records] == [1]  # one warning
    out = engine.generate([PROMPT_IDS], GREEDY)[0]
    want = _engine(tiny_model_dir).generate([PROMPT_IDS], GREEDY)[0]
    assert out.token_ids == want.token_ids and out.text == "" and want.text != ""


@pytest.mark.parametrize(("prompt", "params", "field"), [
    ("Hello", GREEDY, "prompt"),
    (PROMPT_IDS, SamplingParams(max_tokens=4, stop=("x",)), "stop"),
])
def test_text_is_refused_naming_the_file(no_tokenizer_dir, prompt, params, field):
    engine = _engine(no_tokenizer_dir)
    with pytest.raises(MissingTokenizerError, match=rf"^{field}: text needs .*tokenizer\.json") as e:
        engine.add_request("r", prompt, params)
    assert "\n" not in str(e.value)
    assert not engine.has_unfinished()


def test_cli_prompt_ids_work_and_text_exits_2(no_tokenizer_dir, capsys):
    assert main(["generate", "--model", str(no_tokenizer_dir), "--prompt-ids", "1,5,6,7", "--max-tokens", "6",
                 "--temperature", "0", "--ignore-eos", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert len(record["token_ids"]) == 6 and record["text"] == ""
    assert main(["generate", "--model", str(no_tokenizer_dir), "--prompt", "Hello"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokenizer.json" in err[0] and err[0].startswith("moe-runtime generate: error:")
