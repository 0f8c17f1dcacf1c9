"""The supported families: config.json parsing, the registry, the checkpoint layouts (against the names
transformers itself saves), and the errors for what is not supported."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pytest
import torch
import transformers

from moe_runtime.checkpoint import layout
from moe_runtime.checkpoint.layout import LAYOUTS, expected_tensors, shared_bytes
from moe_runtime.checkpoint.loader import load_model
from moe_runtime.config import SUPPORTED_ARCHITECTURES, ModelConfig
from moe_runtime.errors import CheckpointError, ConfigError
from moe_runtime.kernels.attention import AttentionMetadata
from moe_runtime.model import registry
from moe_runtime.model.registry import FAMILIES, build_model
from moe_runtime.presets.configs import preset_config

ROOT = Path(__file__).resolve().parents[2]
QWEN3_30B = json.loads((ROOT / "configs" / "models" / "qwen3-30b-a3b" / "config.json").read_text())
# The fields of the published config.json of Qwen1.5-MoE-A2.7B and OLMoE-1B-7B that the runtime reads.
QWEN15_MOE = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 2048,
              "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
              "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "num_experts": 60,
              "num_experts_per_tok": 4, "norm_topk_prob": False, "moe_intermediate_size": 1408,
              "shared_expert_intermediate_size": 5632, "max_position_embeddings": 8192, "decoder_sparse_step": 1,
              "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 21,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
OLMOE_1B_7B = {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "hidden_size": 2048,
               "intermediate_size": 1024, "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
               "vocab_size": 50304, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "num_experts": 64,
               "num_experts_per_tok": 8, "norm_topk_prob": False, "clip_qkv": None, "attention_bias": False,
               "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def hf_config(hf: dict) -> transformers.PretrainedConfig:
    return transformers.AutoConfig.for_model(hf["model_type"], **{k: v for k, v in hf.items() if k != "model_type"})


def test_the_three_tables_name_the_same_architectures():
    assert set(FAMILIES) == set(LAYOUTS) == set(SUPPORTED_ARCHITECTURES)
    assert [name for name, f in FAMILIES.items() if f.native_decode] == ["MixtralForCausalLM"]
    for name, family in FAMILIES.items():
        assert family.model.__name__ == name  # transformers' class of the same name is the parity reference


@pytest.mark.parametrize("module", (layout, registry), ids=lambda m: m.__name__)
def test_doctests(module):
    assert doctest.testmod(module).failed == 0


def test_published_configs():
    q3 = ModelConfig.from_hf(QWEN3_30B)
    assert (q3.architecture, q3.num_local_experts, q3.num_experts_per_tok, q3.intermediate_size) == (
        "Qwen3MoeForCausalLM", 128, 8, 768)
    assert (q3.head_dim, q3.hidden_size, q3.num_hidden_layers, q3.norm_topk_prob) == (128, 2048, 48, True)
    assert q3.dense_layers == () and q3.moe_layers == tuple(range(48)) and q3.sliding_window is None
    assert not (q3.qkv_bias or q3.o_bias) and q3.shared_expert_intermediate_size is None
    q2 = ModelConfig.from_hf(QWEN15_MOE)
    assert (q2.num_local_experts, q2.num_experts_per_tok, q2.intermediate_size) == (60, 4, 1408)
    assert (q2.shared_expert_intermediate_size, q2.norm_topk_prob, q2.qkv_bias, q2.o_bias) == (5632, False, True, False)
    assert q2.sliding_window is None  # use_sliding_window: false
    ol = ModelConfig.from_hf(OLMOE_1B_7B)
    assert (ol.num_local_experts, ol.num_experts_per_tok, ol.intermediate_size, ol.norm_topk_prob) == (64, 8, 1024, False)
    assert ol.clip_qkv is None and ol.head_dim == 128


def test_dense_layers_as_transformers_decides():
    base = preset_config("tiny-qwen3moe", num_hidden_layers=6)
    assert ModelConfig.from_hf({**base, "decoder_sparse_step": 2}).dense_layers == (0, 2, 4)
    assert ModelConfig.from_hf({**base, "mlp_only_layers": [0, 5]}).moe_layers == (1, 2, 3, 4)
    cfg = ModelConfig.from_hf({**base, "decoder_sparse_step": 3, "mlp_only_layers": [5]})
    assert cfg.moe_layers == (2,) and cfg.dense_intermediate_size == 256
    for arch, hf in (("Qwen3MoeForCausalLM", base), ("Qwen2MoeForCausalLM", preset_config("tiny-qwen2moe"))):
        hf_cfg = hf_config({**hf, "num_hidden_layers": 6, "decoder_sparse_step": 3, "mlp_only_layers": [5]})
        model = getattr(transformers, arch)(hf_cfg)
        sparse = tuple(l for l, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts"))
        assert sparse == (2,), arch


HF_ERRORS = (
    ({"architectures": ["DeepseekV3ForCausalLM"]}, r"architectures=\['DeepseekV3ForCausalLM'\].*is not supported; "
     r"allowed: \['MixtralForCausalLM', 'Qwen2MoeForCausalLM', 'Qwen3MoeForCausalLM', 'OlmoeForCausalLM'\]"),
    ({"mlp_only_layers": [0, 1]}, r"every layer is dense"),
    ({"decoder_sparse_step": 0}, r"decoder_sparse_step=0 is not supported; allowed: an integer >= 1"),
    ({"moe_intermediate_size": None}, r"required key\(s\) missing: intermediate_size"),
    ({"num_experts_per_tok": 200}, r"num_experts_per_tok \(200\) must be <= num_local_experts \(128\)"),
)


@pytest.mark.parametrize("patch, message", HF_ERRORS)
def test_hf_config_errors(patch, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf({**preset_config("tiny-qwen3moe"), **patch})


def test_family_specific_refusals():
    with pytest.raises(ConfigError, match=r"use_sliding_window=true .* not supported for Qwen2MoeForCausalLM"):
        ModelConfig.from_hf({**preset_config("tiny-qwen2moe"), "use_sliding_window": True})
    with pytest.raises(ConfigError, match=r"sliding_window=16 is not supported for OlmoeForCausalLM"):
        ModelConfig.from_hf({**preset_config("tiny-olmoe"), "sliding_window": 16})
    assert ModelConfig.from_hf({**preset_config("tiny-qwen3moe"), "use_sliding_window": True,
                                "sliding_window": 16}).sliding_window == 16


def test_unsupported_checkpoint_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["JambaForCausalLM"], "model_type": "jamba"}))
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path)
    message = str(info.value)
    assert "\n" not in message and "JambaForCausalLM" in message and "OlmoeForCausalLM" in message


# Families and overrides whose every tensor variant appears: dense layers, biases, q/k norms, shared experts.
SAVED = (
    ("tiny-qwen3moe", dict(num_hidden_layers=3, mlp_only_layers=[1], attention_bias=True, num_experts=4,
                           num_experts_per_tok=2)),
    ("tiny-qwen2moe", dict(num_hidden_layers=2, decoder_sparse_step=2, num_experts=4, num_experts_per_tok=2)),
    ("tiny-olmoe", dict(attention_bias=True, num_experts=4, num_experts_per_tok=2, tie_word_embeddings=True)),
    ("tiny", dict(num_local_experts=4)),
)


@pytest.mark.parametrize("preset, overrides", SAVED, ids=[s[0] for s in SAVED])
def test_layout_is_what_transformers_saves(tmp_path, preset, overrides):
    """A model transformers builds and saves loads here (every name and shape checked by CheckpointFiles)
    and computes the same logits; the layout names exactly the tensors it saved."""
    hf_json = preset_config(preset, **overrides)
    hf_cfg = hf_config(hf_json)
    torch.manual_seed(0)
    ref = getattr(transformers, hf_json["architectures"][0])(hf_cfg).eval()
    ref.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    cfg = ModelConfig.from_pretrained(tmp_path)
    assert saved == expected_tensors(cfg)
    ours = load_model(tmp_path, dtype="float32")
    ids = [1, 5, 9, 300, 7]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    got = ours.compute_logits(ours(torch.tensor(ids), torch.arange(5), AttentionMetadata.for_prompts([5])))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_shared_bytes_are_everything_but_the_routed_experts():
    cfg = ModelConfig.from_hf(preset_config("tiny-qwen2moe", num_hidden_layers=4, decoder_sparse_step=2))
    with torch.device("meta"):
        model = build_model(cfg)
    routed = {id(b.experts.w13) for b in model.moe_blocks().values()} | {id(b.experts.w2) for b in model.moe_blocks().values()}
    elements = sum(p.numel() for p in model.parameters() if id(p) not in routed)
    assert shared_bytes(cfg, "float32") == elements * 4


@pytest.mark.parametrize("preset, model_type", (("tiny-qwen3moe", "qwen3_moe"), ("tiny-qwen2moe", "qwen2_moe"),
                                                ("tiny-olmoe", "olmoe")))
def test_init_model_presets(tmp_path, capsys, preset, model_type):
    from moe_runtime.checkpoint.dummy import dummy_model
    from moe_runtime.cli import main

    assert main(["init-model", "--preset", preset, str(tmp_path / "m")]) == 0
    assert f"wrote {preset} checkpoint" in capsys.readouterr().out
    assert transformers.AutoConfig.from_pretrained(tmp_path / "m").model_type == model_type
    cfg = ModelConfig.from_pretrained(tmp_path / "m")
    assert cfg == ModelConfig.from_hf(preset_config(preset))
    real = load_model(tmp_path / "m", dtype="float32", device="cpu")
    dummy = dummy_model(cfg, "float32", "cpu", seed=1)  # `model.load_format: dummy`: config.json alone
    assert {n: p.shape for n, p in dummy.named_parameters()} == {n: p.shape for n, p in real.named_parameters()}
