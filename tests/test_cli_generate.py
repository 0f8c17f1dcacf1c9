"""`moe-runtime generate` through the engine: JSON per prompt, batching, flags, errors, default model."""

from __future__ import annotations

import json
import re

import pytest

from moe_runtime.cli import main
from moe_runtime.config import load_config
from moe_runtime.engine.llm_engine import LLMEngine
from moe_runtime.engine.sampling_params import SamplingParams
from moe_runtime.errors import RequestError


def _run_json(capsys, argv) -> list[dict]:
    assert main(argv) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_json_one_object_per_prompt_matches_the_engine(tiny_model_dir, capsys, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("third prompt\n\nfourth one\n")
    records = _run_json(capsys, [
        "generate", "--model", str(tiny_model_dir), "--prompt", "Hello there", "--prompt-ids", "1,5,6,7",
        "--prompts-file", str(prompts_file), "--max-tokens", "6", "--temperature", "0", "--ignore-eos", "--json",
    ])
    assert len(records) == 4
    engine = LLMEngine(load_config(overrides=[f"model.path={tiny_model_dir}", "cache.num_blocks=64"]))
    want = engine.generate(["Hello there", [1, 5, 6, 7], "third prompt", "fourth one"],
                           SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    for rec, out in zip(records, want, strict=True):
        assert rec["token_ids"] == out.token_ids and rec["text"] == out.text
        assert rec["finish_reason"] == "length"
    assert records[1]["num_prompt_tokens"] == 4


def test_sampling_flags_stop_and_logprobs(tiny_model_dir, capsys):
    base = ["generate", "--model", str(tiny_model_dir), "--prompt-ids", "1,5,6", "--json", "--ignore-eos"]
    first = _run_json(capsys, [*base, "--max-tokens", "8", "--temperature", "0.8", "--top-k", "50",
                               "--top-p", "0.9", "--min-p", "0.01", "--seed", "3", "--logprobs", "2"])[0]
    again = _run_json(capsys, [*base, "--max-tokens", "8", "--temperature", "0.8", "--top-k", "50",
                               "--top-p", "0.9", "--min-p", "0.01", "--seed", "3", "--logprobs", "2"])[0]
    assert first == again and len(first["logprobs"]) == 8 and len(first["logprobs"][0]["top"]) == 2
    stop_id = first["token_ids"][3]
    cut = _run_json(capsys, [*base, "--max-tokens", "8", "--temperature", "0.8", "--top-k", "50", "--top-p",
                             "0.9", "--min-p", "0.01", "--seed", "3", "--stop-token-ids", str(stop_id)])[0]
    assert cut["finish_reason"] == "stop" and cut["token_ids"][-1] == stop_id


BAD_ARGS = (
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--prompt-ids", "1,x"], "--prompt-ids"),
    (["--max-tokens", "many"], "--max-tokens"),
)


@pytest.mark.parametrize(("extra", "word"), BAD_ARGS)
def test_bad_arguments_exit_2_with_one_line(tiny_model_dir, capsys, extra, word):
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "hi", *extra]
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and word in err and "\n" not in err


def test_no_prompt_is_a_usage_error(tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tiny_model_dir)])
    assert e.value.code == 2 and "--prompt" in capsys.readouterr().err


def test_default_model_is_created_once_in_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOE_RUNTIME_CACHE", str(tmp_path / "cache"))
    argv = ["generate", "--prompt", "hi", "--max-tokens", "3", "--temperature", "0", "--json"]
    first = _run_json(capsys, argv)
    model_dir = tmp_path / "cache" / "models" / "tiny"
    assert (model_dir / "config.json").exists()
    assert [p.name for p in model_dir.parent.iterdir()] == ["tiny"]  # no temporary directory left behind
    assert _run_json(capsys, argv) == first


def test_the_cli_parser_and_client_commands_do_not_import_torch():
    """`moe-runtime --help`, `stats --server` and `generate --server` start in a fraction of a second: building
    the parser imports every command module, none of which may pull in torch (about 1.5 s) at import time."""
    import subprocess
    import sys

    probe = ("import sys; from moe_runtime import cli; cli.build_parser(); "
             "import moe_runtime.server.client, moe_runtime.commands.stats; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_empty_text_is_refused_offline_as_over_grpc(tiny_model_dir, capsys):
    """An empty prompt used to run offline on BOS alone; the engine now refuses it wherever it comes from."""
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "", "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "moe-runtime generate: error: prompt='': empty; send text or token ids"
    engine = LLMEngine(load_config(overrides=[f"model.path={tiny_model_dir}", "cache.num_blocks=64"]))
    for prompt, words in (("", "prompt='': empty"), ([], "prompt_token_ids: empty"),
                          ("\udcff", "prompt: not valid Unicode")):
        with pytest.raises(RequestError, match=re.escape(words)):
            engine.make_request("r", prompt)


def test_text_longer_than_the_context_can_hold_is_refused_before_tokenizing(tiny_model_dir, monkeypatch):
    engine = LLMEngine(load_config(overrides=[f"model.path={tiny_model_dir}", "cache.num_blocks=64",
                                              "engine.max_model_len=64"]))
    limit = 63 * engine.tokenizer.max_token_bytes

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized text that cannot fit")

    assert len(engine.encode("é" * (limit // 2))) > 1  # at the bound (2 bytes each): tokenized
    monkeypatch.setattr(engine.tokenizer, "encode", no_tokenizing)
    with pytest.raises(RequestError, match=rf"prompt=<{limit + 2} bytes of text>: longer than the context; "
                                           rf"allowed: at most {limit} bytes \(63 tokens"):
        engine.encode("é" * (limit // 2 + 1))
