"""Config: HF config.json parsing and the YAML tree, with errors naming the path, value and allowed values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_runtime.config import ModelConfig, RuntimeConfig, load_config
from moe_runtime.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# The published config.json of Mixtral-8x7B-v0.1 (no weights), shipped for dummy-weight runs and planning.
FIXTURE = Path(__file__).resolve().parents[1] / "configs" / "models" / "mixtral-8x7b-v0.1" / "config.json"
MIXTRAL = json.loads(FIXTURE.read_text())


def test_real_mixtral_config():
    cfg = ModelConfig.from_hf(MIXTRAL)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (4096, 14336, 32)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (32, 8, 128)
    assert (cfg.num_local_experts, cfg.num_experts_per_tok, cfg.vocab_size) == (8, 2, 32000)
    assert cfg.rope_theta == 1e6 and cfg.sliding_window is None and cfg.eos_token_ids == (2,)
    assert cfg.torch_dtype == "bfloat16" and not cfg.tie_word_embeddings


def base() -> dict:
    return {"architectures": ["MixtralForCausalLM"], "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_local_experts": 4, "num_experts_per_tok": 2}


def test_defaults_and_derived_head_dim():
    cfg = ModelConfig.from_hf(base())
    assert cfg.head_dim == 16 and cfg.rope_theta == 1e6 and cfg.rms_norm_eps == 1e-5


def test_rope_parameters_form():
    cfg = ModelConfig.from_hf({**base(), "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}})
    assert cfg.rope_theta == 500.0


def test_eos_list():
    assert ModelConfig.from_hf({**base(), "eos_token_id": [2, 7]}).eos_token_ids == (2, 7)


HF_ERRORS = (
    ({"architectures": ["LlamaForCausalLM"]}, r"architectures=\['LlamaForCausalLM'\].*allowed: \['MixtralForCausalLM', "
                                              r"'Qwen2MoeForCausalLM', 'Qwen3MoeForCausalLM', 'OlmoeForCausalLM'\]"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported; allowed: \['silu'\]"),
    ({"rope_scaling": {"rope_type": "yarn"}}, r"rope_type='yarn' is not supported; allowed: \['default'\]"),
    ({"num_experts_per_tok": 5}, r"num_experts_per_tok \(5\) must be <= num_local_experts \(4\)"),
    ({"num_key_value_heads": 3}, r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"),
    ({"hidden_size": -64}, r"hidden_size=-64: Input should be greater than 0"),
    ({"torch_dtype": "int8"}, r"torch_dtype='int8': Input should be 'bfloat16', 'float16' or 'float32'"),
    ({"vocab_size": None}, r"required key\(s\) missing: vocab_size"),
)


@pytest.mark.parametrize("patch, message", HF_ERRORS)
def test_hf_config_errors(patch, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf({**base(), **patch})


def test_yaml_sections_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("engine:\n  max_num_seqs: 4\nserver:\n  port: 6000\n")
    cfg = load_config(path, ["engine.max_num_batched_tokens=512", "model.dtype=bfloat16", "cache.block_size=8"])
    assert (cfg.engine.max_num_seqs, cfg.engine.max_num_batched_tokens) == (4, 512)
    assert (cfg.server.port, cfg.model.dtype, cfg.cache.block_size) == (6000, "bfloat16", 8)
    assert load_config() == RuntimeConfig()


YAML_ERRORS = (
    ("engine:\n  max_num_seq: 4\n", r"engine\.max_num_seq: unknown key; allowed: \[.*'max_num_seqs'"),
    ("bogus: {}\n", r"bogus: unknown key; allowed: \['cache', 'engine', 'executor'"),
    ("engine:\n  max_num_seqs: 0\n", r"engine\.max_num_seqs=0: Input should be greater than 0"),
    ("model:\n  dtype: fp8\n", r"model\.dtype='fp8': Input should be 'auto', 'bfloat16', 'float16' or 'float32'"),
    ("executor: slurm\n", r"executor='slurm': Input should be 'local' or 'ray'"),
    ("executor: ray\noffload:\n  enabled: true\n  resident_experts_per_layer: 4\n",
     r"executor='ray' with offload\.enabled=true is not supported"),
    ("- a\n- b\n", r"top level must be a mapping of sections, got list"),
    ("engine: [\n", r"not valid YAML \(expected the node content, but found '<stream end>' at line 2, column 1"),
    ("cache:\n  memory_bytes: lots\n", r"cache\.memory_bytes='lots': expected bytes as an integer or with a unit"),
)


@pytest.mark.parametrize("text, message", YAML_ERRORS)
def test_yaml_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


@pytest.mark.parametrize("item, message", [
    ("engine.max_num_seqs", r"expected section\.key=value"),
    ("engine..x=1", r"expected section\.key=value"),
    ("executor.kind=ray", r"'executor' is a value, not a section"),
    ("engine.max_num_seqs=lots", r"engine\.max_num_seqs='lots': Input should be a valid integer"),
])
def test_override_errors(item, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[item] if "kind" not in item else ["executor=local", item])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: not found"):
        load_config(tmp_path / "nope.yaml")


def test_configs_are_frozen():
    cfg = load_config()
    with pytest.raises(Exception, match="frozen"):
        cfg.engine.max_num_seqs = 3


def test_tiny_cpu_yaml_is_what_serve_runs_with_no_config():
    """configs/tiny-cpu.yaml spells out the defaults; it must never drift from them."""
    assert load_config(ROOT / "configs" / "tiny-cpu.yaml") == load_config()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_loads(path):
    load_config(path)


def test_yaml_errors_are_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("server:\n  port: 1\n   host: x\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "\n" not in str(err.value) and "at line 3, column 8" in str(err.value)


def test_request_and_response_limits_and_cache_bytes():
    cfg = load_config(overrides=["server.max_request_bytes=65536", "cache.memory_bytes=64MiB"])
    assert (cfg.server.max_request_bytes, cfg.server.max_message_bytes) == (65536, 4 * 2**20)
    assert cfg.cache.memory_bytes == 64 * 2**20
