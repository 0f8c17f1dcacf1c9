"""`moe-runtime generate --server`: the offline flags and `--json` records, over gRPC."""

from __future__ import annotations

import json

import pytest

from moe_runtime.cli import main

FLAGS = (
    ["--prompt", "Hello world", "--max-tokens", "8", "--temperature", "0"],
    ["--prompt", "Experts", "--prompt-ids", "1,5,9", "--max-tokens", "5", "--seed", "3", "--top-k", "20",
     "--logprobs", "2"],
)


@pytest.fixture(scope="module")
def server(start_server):
    with start_server() as srv:
        yield srv


def _lines(capsys, argv) -> list[str]:
    assert main(argv) == 0
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("flags", FLAGS)
def test_json_records_equal_offline(server, tiny_model_dir, capsys, flags):
    offline_argv = ["generate", "--model", str(tiny_model_dir), "--set", "cache.num_blocks=256", *flags, "--json"]
    offline = [json.loads(x) for x in _lines(capsys, offline_argv)]
    remote = [json.loads(x) for x in _lines(capsys, ["generate", "--server", server.address, *flags, "--json"])]
    for want, got in zip(offline, remote, strict=True):
        assert got.keys() == want.keys()
        assert {k: v for k, v in got.items() if k != "logprobs"} == {k: v for k, v in want.items() if k != "logprobs"}
        for a, b in zip(got.get("logprobs", []), want.get("logprobs", []), strict=True):
            assert a["token_id"] == b["token_id"] and a["logprob"] == pytest.approx(b["logprob"])


def test_streams_text_without_json(server, capsys):
    record = json.loads(_lines(capsys, ["generate", "--server", server.address, *FLAGS[0], "--json"])[0])
    assert _lines(capsys, ["generate", "--server", server.address, *FLAGS[0]]) == [record["text"]]


def test_bad_request_is_one_line_exit_2(server, capsys):
    assert main(["generate", "--server", server.address, "--prompt", "hi", "--top-p", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "INVALID_ARGUMENT" in err and "sampling_params.top_p=0.0" in err and "\n" not in err


def test_server_with_model_is_a_usage_error(server, tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--server", server.address, "--model", str(tiny_model_dir), "--prompt", "hi"])
    assert exit_.value.code == 2 and "drop --model" in capsys.readouterr().err
