"""Quantized experts in the model: `model.quantization` builds 8-bit experts, the loader quantizes each expert
matrix per row as it reads it, and the model then computes what the 16-bit model computes on the dequantized
weights (the `torch` backend: bit for bit on short prompts, where every expert group runs the 16-bit ops).
"""

from __future__ import annotations

import pytest
import torch

from moe_runtime.checkpoint.dummy import dummy_model
from moe_runtime.checkpoint.loader import load_model, quantized_parts
from moe_runtime.config import ModelConfig, load_config
from moe_runtime.errors import ConfigError
from moe_runtime.kernels.attention import AttentionMetadata
from moe_runtime.kernels.quant import quantize
from moe_runtime.model.experts import LocalExperts, QuantizedLocalExperts
from moe_runtime.model.parts import ModelParts

PROMPT = [1, 17, 45, 3, 99, 87, 12, 5, 64, 33, 7]


def logits(model, seq=PROMPT):
    h = model(torch.tensor(seq), torch.arange(len(seq)), AttentionMetadata.for_prompts([len(seq)]))
    return model.compute_logits(h)


@pytest.mark.parametrize("scheme,qdtype", (("int8", torch.int8), ("fp8", torch.float8_e4m3fn)))
@pytest.mark.parametrize("dtype", ("bfloat16", "float32"))
def test_loader_quantizes_each_expert_per_row(tiny_model_dir, scheme, qdtype, dtype):
    quant = load_model(tiny_model_dir, dtype, "cpu", quantization=scheme)
    plain = load_model(tiny_model_dir, dtype, "cpu")
    stored = load_model(tiny_model_dir, "float32", "cpu")  # the checkpoint's own values (tiny is fp32)
    for l, block in quant.moe_blocks().items():
        experts = block.experts
        assert isinstance(experts, QuantizedLocalExperts) and experts.scheme == scheme
        assert experts.w13.dtype == qdtype and experts.w2.dtype == qdtype
        assert experts.w13_scale.dtype == torch.float32 and experts.w2_scale.dtype == torch.float32  # not cast
        ref, orig = plain.moe_blocks()[l].experts, stored.moe_blocks()[l].experts
        for mine, theirs in ((experts.w13, orig.w13), (experts.w2, orig.w2)):
            want = quantize(theirs, scheme)  # from the checkpoint's tensor, not from its rounding to `dtype`
            assert torch.equal(mine.data.float(), want.data.float()) and torch.equal(mine.scale, want.scale)
        # the 16-bit model given the dequantized weights is, by definition, the quantized model
        ref.w13.copy_(experts.w13.dequantize(ref.w13.dtype))
        ref.w2.copy_(experts.w2.dequantize(ref.w2.dtype))
    assert torch.equal(logits(quant), logits(plain))
    assert quant.dtype == getattr(torch, dtype)  # dense weights keep the model dtype


def test_expert_bytes_halve_with_int8(tiny_model_dir):
    def expert_bytes(model):
        return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)

    sixteen = expert_bytes(load_model(tiny_model_dir, "bfloat16", "cpu"))
    eight = expert_bytes(load_model(tiny_model_dir, "bfloat16", "cpu", quantization="int8"))
    assert sixteen / 2 <= eight <= sixteen / 2 * 1.05  # + one fp32 scale per row


def test_dummy_weights_quantized():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, rope_theta=1e4,
                      rms_norm_eps=1e-5, max_position_embeddings=64)
    model = dummy_model(cfg, "bfloat16", "cpu", quantization="int8")
    experts = model.layers[0].block_sparse_moe.experts
    assert isinstance(experts, QuantizedLocalExperts) and experts.w13_scale.dtype == torch.float32
    assert experts.w13.data.abs().amax(-1).eq(127).all()  # each row quantized from its own absmax
    assert torch.isfinite(logits(model, [1, 2, 3])).all()


def test_config_names_field_value_and_allowed():
    with pytest.raises(ConfigError, match=r"model\.quantization='int4'.*'none', 'int8' or 'fp8'"):
        load_config(overrides=["model.quantization=int4"])
    assert load_config(overrides=["model.quantization=int8"]).model.quantization == "int8"
    assert load_config().model.quantization == "none"


def test_experts_that_cannot_quantize_say_so():
    class Elsewhere:  # an ExpertsBuilder without `quantized` (e.g. one of another package)
        def build(self, cfg, layer): ...

        def finish(self, model, model_dir, location): ...

    with pytest.raises(ConfigError, match=r"model.quantization='int8' is not supported with Elsewhere"):
        quantized_parts(ModelParts(experts=Elsewhere()), "int8")
    assert isinstance(quantized_parts(ModelParts(), "none").experts.build, object)


def test_engine_serves_int8_experts(tiny_model_dir, tmp_path):
    from moe_runtime.engine.llm_engine import LLMEngine
    from moe_runtime.engine.sampling_params import SamplingParams

    engine = LLMEngine(load_config(overrides=[f"model.path={tiny_model_dir}", "model.device=cpu",
                                              "model.dtype=bfloat16", "model.quantization=int8",
                                              f"engine.cpu_plan_dir={tmp_path}", "cache.num_blocks=64"]))
    experts = engine.executor.model.layers[0].block_sparse_moe.experts
    assert isinstance(experts, LocalExperts) and experts.w13.dtype == torch.int8
    engine.add_request("a", PROMPT, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    out = None
    while engine.has_unfinished():
        out = engine.step() or out
    assert len(out[0].token_ids) == 8
