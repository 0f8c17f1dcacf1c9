"""Mistakes a new user makes get one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import pytest

from moe_runtime.cli import main

ONE_LINE_ERRORS = (  # (case, argv with {tmp} and {model}, words the line must hold); all exit 1
    ("stats --tls-ca missing", ["stats", "--server", "127.0.0.1:1", "--tls-ca", "{tmp}/nope.pem"],
     "--tls-ca {tmp}/nope.pem: cannot read (No such file or directory)"),
    ("generate --tls-ca missing", ["generate", "--server", "127.0.0.1:1", "--tls-ca", "{tmp}/nope.pem", "--prompt",
                                   "hi"], "--tls-ca {tmp}/nope.pem: cannot read"),
    ("--tls-ca not a certificate", ["stats", "--server", "127.0.0.1:1", "--tls-ca", "{model}/config.json"],
     "no PEM certificate in it"),
    ("--model is a file", ["generate", "--model", "{model}/config.json", "--prompt", "hi"],
     "{model}/config.json: a file, not a model directory"),
    ("serve --model is a file", ["serve", "--model", "{model}/config.json", "--port", "0", "--metrics-port", "0"],
     "a file, not a model directory"),
    ("--model missing", ["generate", "--model", "{tmp}/none", "--prompt", "hi"], "config.json: not found"),
    ("config not UTF-8", ["generate", "--config", "{tmp}/latin1.yaml", "--prompt", "hi"],
     "latin1.yaml: not UTF-8 text (byte 0xe9 at offset 16)"),
    ("YAML syntax error", ["generate", "--config", "{tmp}/broken.yaml", "--prompt", "hi"],
     "broken.yaml: not valid YAML (expected the node content, but found '<stream end>' at line 3, column 1"),
    ("config is a directory", ["serve", "--config", "{tmp}"], "cannot read (Is a directory)"),
    ("init-model onto a file", ["init-model", "{tmp}/latin1.yaml"], "latin1.yaml: a file, not a directory"),
    ("init-model onto a checkpoint", ["init-model", "{model}"], "already holds a checkpoint (config.json, "),
    ("server not there", ["stats", "--server", "127.0.0.1:1", "--timeout", "5"], "UNAVAILABLE"),
)


@pytest.fixture
def files(tmp_path, tiny_model_dir):
    (tmp_path / "latin1.yaml").write_bytes("engine: {}\n# caf\u00e9\n".encode("latin-1"))
    (tmp_path / "broken.yaml").write_text("engine:\n  max_num_seqs: [1,\n")
    return {"tmp": str(tmp_path), "model": str(tiny_model_dir)}


@pytest.mark.parametrize(("case", "argv", "words"), ONE_LINE_ERRORS, ids=[c[0] for c in ONE_LINE_ERRORS])
def test_one_line_never_a_traceback(files, capsys, case, argv, words):
    rc = main([a.format(**files) for a in argv])
    out = capsys.readouterr()
    err = out.err.strip()
    assert rc == 1 and "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"moe-runtime {argv[0]}: error: ") and words.format(**files) in err, err


def test_init_model_replaces_a_checkpoint_only_with_force(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["init-model", "--max-shard-bytes", "200000", str(out)]) == 0
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    (out / "notes.txt").write_text("mine")
    assert main(["init-model", str(out)]) == 1
    assert "pass --force to replace it" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards  # untouched
    assert main(["init-model", "--force", str(out)]) == 0
    # the old shards and index are gone (a loader would otherwise find two checkpoints); other files stay
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.txt",
                                                     "tokenizer.json", "tokenizer_config.json"]


@pytest.mark.parametrize(("token", "words"), (("", "set but empty"), ("two words", "other than visible ASCII")))
def test_a_bad_auth_token_is_an_error_not_auth_off(monkeypatch, capsys, token, words):
    monkeypatch.setenv("MOE_RUNTIME_AUTH_TOKEN", token)
    assert main(["stats", "--server", "127.0.0.1:1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("moe-runtime stats: error: MOE_RUNTIME_AUTH_TOKEN is set but") and words in err
    assert "unset it to run without auth" in err
