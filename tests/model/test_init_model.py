"""init-model: complete HF checkpoints, byte-identical for the same seed."""

from __future__ import annotations

import hashlib
import json

import pytest
from safetensors.torch import load_file
from transformers import AutoConfig

from moe_runtime.cli import main
from moe_runtime.config import ModelConfig
from moe_runtime.presets.configs import PRESETS, preset_config
from moe_runtime.presets.init_model import init_model, write_checkpoint

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def digest(d):
    return {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in FILES}


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = init_model("tiny", tmp_path / "a", seed=7)
    b = init_model("tiny", tmp_path / "b", seed=7)
    c = init_model("tiny", tmp_path / "c", seed=8)
    assert digest(a) == digest(b)
    assert digest(a)["model.safetensors"] != digest(c)["model.safetensors"]


def test_cli_writes_a_checkpoint_transformers_reads(tmp_path, capsys):
    assert main(["init-model", "--preset", "tiny", "--seed", "3", str(tmp_path / "m")]) == 0
    assert "wrote tiny checkpoint" in capsys.readouterr().out
    hf = AutoConfig.from_pretrained(tmp_path / "m")
    assert hf.model_type == "mixtral" and hf.num_local_experts == 8
    assert ModelConfig.from_pretrained(tmp_path / "m") == ModelConfig.from_hf(PRESETS["tiny"])


def test_cli_rejects_unknown_preset(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["init-model", "--preset", "huge", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "invalid choice: 'huge'" in err


def test_mini_preset_is_the_benchmark_size():
    cfg = ModelConfig.from_hf(preset_config("mini"))
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (1024, 3584, 8)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_local_experts) == (16, 4, 8)
    assert (cfg.num_experts_per_tok, cfg.vocab_size, cfg.torch_dtype) == (2, 32000, "bfloat16")


def test_sharded_index(tmp_path):
    d = write_checkpoint(tmp_path / "s", preset_config("tiny"), seed=0, max_shard_bytes=300_000)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((d / s).exists() for s in shards)
    tensors = {}
    for shard in shards:
        tensors.update(load_file(d / shard))
    assert sorted(tensors) == sorted(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
