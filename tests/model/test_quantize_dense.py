"""8-bit dense projections (`model.quantize_dense`): q/k/v, o and the LM head stored in the experts' 8-bit
format with a scale per row, quantized per row as the loader reads them. With the `torch` kernels the model
computes, bit for bit, what the 16-bit model computes on the dequantized weights (the definition); the CPU
fast path runs int8 projections natively (eager ops and the native decode step) within the 16-bit kernel
tolerances of that.
"""

from __future__ import annotations

import pytest
import torch

from moe_runtime.checkpoint.dummy import dummy_model
from moe_runtime.checkpoint.loader import WeightFormats, load_model, weight_formats
from moe_runtime.config import ModelConfig, load_config
from moe_runtime.errors import ConfigError
from moe_runtime.kernels.attention import AttentionMetadata
from moe_runtime.kernels.quant import quantize
from moe_runtime.model.layers import Linear

PROMPT = [1, 17, 45, 3, 99, 87, 12, 5, 64, 33, 7]
HAS_AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def logits(model, seq=PROMPT):
    h = model(torch.tensor(seq), torch.arange(len(seq)), AttentionMetadata.for_prompts([len(seq)]))
    return model.compute_logits(h)


def dense_linears(model) -> dict[str, Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear)}


@pytest.mark.parametrize("scheme,qdtype", (("int8", torch.int8), ("fp8", torch.float8_e4m3fn)))
def test_loader_quantizes_each_dense_projection_per_row(tiny_model_dir, scheme, qdtype):
    quant = load_model(tiny_model_dir, "bfloat16", "cpu", quantization=scheme, quantize_dense=True)
    plain = load_model(tiny_model_dir, "bfloat16", "cpu", quantization=scheme)  # the same 8-bit experts
    stored = load_model(tiny_model_dir, "float32", "cpu")  # the checkpoint's own values (tiny is fp32)
    mine, theirs, orig = dense_linears(quant), dense_linears(plain), dense_linears(stored)
    assert set(mine) == {"lm_head"} | {f"layers.{i}.self_attn.{p}" for i in range(2) for p in ("qkv_proj", "o_proj")}
    for name, lin in mine.items():
        assert lin.scheme == scheme and lin.weight_data.dtype == qdtype and lin.weight_scale.dtype == torch.float32
        assert not hasattr(lin, "weight")
        want = quantize(orig[name].weight, scheme)  # per row of the stacked q/k/v: each row from its own absmax
        assert torch.equal(lin.matrix.data.float(), want.data.float()) and torch.equal(lin.matrix.scale, want.scale)
        theirs[name].weight.copy_(lin.matrix.dequantize(torch.bfloat16))  # the definition of the 8-bit model
    assert torch.equal(logits(quant), logits(plain))


def test_dense_bytes_halve(tiny_model_dir):
    def dense_bytes(model):
        return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                   if "self_attn" in n or n.startswith("lm_head"))

    sixteen = dense_bytes(load_model(tiny_model_dir, "bfloat16", "cpu", quantization="int8"))
    eight = dense_bytes(load_model(tiny_model_dir, "bfloat16", "cpu", quantization="int8", quantize_dense=True))
    assert sixteen / 2 <= eight <= sixteen / 2 * 1.1  # + one fp32 scale per row (tiny's rows are short)


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                       num_experts_per_tok=2, rope_theta=1e4, rms_norm_eps=1e-5, max_position_embeddings=64, **kw)


def test_a_tied_head_stays_the_embedding():
    model = dummy_model(_cfg(tie_word_embeddings=True), "bfloat16", "cpu", quantization="int8", quantize_dense=True)
    assert model.lm_head.scheme == "none" and model.lm_head.weight is model.embed_tokens.weight
    attn = model.layers[0].self_attn
    assert attn.qkv_proj.scheme == "int8" and attn.qkv_proj.weight_data.abs().amax(-1).eq(127).all()
    assert torch.isfinite(logits(model, [1, 2, 3])).all()


def test_quantize_dense_needs_8bit_experts(tiny_model_dir):
    with pytest.raises(ConfigError, match=r"model\.quantize_dense=true needs 8-bit experts.*\['int8', 'fp8'\]"):
        load_model(tiny_model_dir, "bfloat16", "cpu", quantize_dense=True)
    cfg = load_config(overrides=[f"model.path={tiny_model_dir}", "model.quantize_dense=true"]).model
    with pytest.raises(ConfigError, match="quantize_dense"):
        weight_formats(tiny_model_dir, cfg)
    cfg = load_config(overrides=["model.quantization=int8", "model.quantize_dense=true"]).model
    assert weight_formats(tiny_model_dir, cfg) == WeightFormats("int8", "int8")
    with pytest.raises(ConfigError, match="model.quantize_dense"):
        load_config(overrides=["model.quantize_dense=maybe"])


@pytest.mark.skipif(not HAS_AVX2, reason="the native CPU kernels run only on AVX2 CPUs")
@pytest.mark.parametrize("scheme,qdtype", (("int8", torch.int8), ("fp8", torch.float8_e4m3fn)))
def test_engine_runs_8bit_projections_natively(scheme, qdtype, tiny_model_dir, tmp_path, monkeypatch):
    """The CPU fast path with 8-bit experts and projections: the native decode step takes the 8-bit
    projections, its plan is measured for them (cached under their own key), and greedy decoding gives
    the tokens of the same engine without the native decode step (eager ops on the same weights). The
    plan is measured, but each op keeps its native implementation wherever it has one: a timing that
    picked torch's GEMM on the dequantized weight (rounded to bf16 first) for the eager run would be
    another arithmetic, and a near-tie in the tiny model's logits could then flip a greedy token."""
    from moe_runtime.engine.cpu_decode import CpuDecodeForward
    from moe_runtime.engine.llm_engine import LLMEngine
    from moe_runtime.engine.sampling_params import SamplingParams
    from moe_runtime.kernels import cpu
    from moe_runtime.kernels.cpu import dispatch

    real_pick = dispatch.pick
    monkeypatch.setattr(dispatch, "pick", lambda times, previous: "native" if "native" in times
                        else real_pick(times, previous))

    def run(native: bool):
        overrides = [f"model.path={tiny_model_dir}", "model.device=cpu", "model.dtype=bfloat16",
                     f"model.quantization={scheme}", "model.quantize_dense=true", f"engine.cpu_plan_dir={tmp_path}",
                     "cache.num_blocks=64"]
        engine = LLMEngine(load_config(overrides=overrides))
        runner = engine.executor.runner
        assert isinstance(runner.forward, CpuDecodeForward)
        if not native:
            runner.forward.plan = None
            monkeypatch.setattr(CpuDecodeForward, "applies", staticmethod(lambda n, meta: False))
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        (out,) = engine.generate([PROMPT], params)
        monkeypatch.undo()
        return engine, out.token_ids

    calls = []
    real = cpu.attention_decode
    monkeypatch.setattr(cpu, "attention_decode", lambda x, w_qkv, *a, **kw: calls.append(w_qkv.dtype) or
                        real(x, w_qkv, *a, **kw))
    engine, native_tokens = run(native=True)
    assert calls and set(calls) == {qdtype}
    plan_files = list(tmp_path.glob("cpu-plan-*.json"))
    qkv = tuple(engine.executor.model.layers[0].self_attn.qkv_proj.matrix.shape)
    assert len(plan_files) == 1 and f'"{qkv[0]}x{qkv[1]} {scheme}"' in plan_files[0].read_text()  # measured so
    _, eager_tokens = run(native=False)
    assert len(native_tokens) == 8 and native_tokens == eager_tokens
