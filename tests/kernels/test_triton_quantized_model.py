"""The tiny model with 8-bit experts on `moe_backend: triton` (the w8a16 kernels, run by the Triton
interpreter on CPU: tests/kernels/conftest.py) against the same model on the torch backend: the same
quantized weights, so logits agree within fp32 rounding (the kernel scales after the K sum) and greedy
decode gives the same tokens; the CUDA-graph runner now takes quantized experts too.
"""

from __future__ import annotations

import pytest
import torch

from moe_runtime.checkpoint.loader import load_model
from moe_runtime.engine.parts import KernelChoice, make_forward
from moe_runtime.kernels.attention import AttentionMetadata
from moe_runtime.model.experts import LocalExpertsBuilder, QuantizedLocalExperts
from moe_runtime.model.parts import ModelParts

PROMPT = [1, 17, 45, 3, 99, 87, 12, 5, 64, 33, 7]


def logits(model, seq=PROMPT):
    h = model(torch.tensor(seq), torch.arange(len(seq)), AttentionMetadata.for_prompts([len(seq)]))
    return model.compute_logits(h)  # [T, V]


@pytest.mark.parametrize("scheme", ("int8", "fp8"))
def test_triton_quantized_experts_give_the_torch_logits(tiny_model_dir, scheme):
    def model(backend):
        parts = ModelParts(experts=LocalExpertsBuilder(backend))
        return load_model(tiny_model_dir, "float32", "cpu", parts=parts, quantization=scheme)

    triton, torch_ = model("triton"), model("torch")
    assert isinstance(triton.layers[0].block_sparse_moe.experts, QuantizedLocalExperts)
    got, want = logits(triton), logits(torch_)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)  # logits O(1): fp32 summation order only
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_cuda_graph_runner_takes_quantized_experts(tiny_model_dir, monkeypatch):
    """`make_forward` no longer turns CUDA graphs off for int8 experts on the triton kernels: on a CUDA
    model it builds the graph runner (checked here through the decision alone: the model is on CPU)."""
    from moe_runtime.config import EngineConfig
    from moe_runtime.engine import parts as parts_mod
    from moe_runtime.engine.kv_cache import allocate_kv_cache

    model = load_model(tiny_model_dir, "float32", "cpu", parts=ModelParts(experts=LocalExpertsBuilder("triton")),
                       quantization="int8")
    kv = allocate_kv_cache(model.config, 8, 4, model.dtype, model.device)
    kernels = KernelChoice(attention="triton", norm="triton", linear="fused", moe="triton", huge_pages=False,
                           native_decode=False)
    built = []

    class Recorder:
        def __init__(self, *args, **kwargs):
            built.append(args)

    import moe_runtime.engine.cuda_graphs as graphs

    monkeypatch.setattr(graphs, "CudaGraphForward", Recorder)
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")), raising=False)
    forward = make_forward(model, kv, kernels, EngineConfig(), graphs_allowed=True)
    assert isinstance(forward, Recorder) and built
    assert parts_mod._formats(model).experts == "int8"


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ("int8", "fp8"))
def test_quantized_graphs_match_eager_on_cuda(tiny_model_dir, scheme):
    """bf16 on CUDA with 8-bit experts: the runner captures decode steps (the w8a16 kernels are graph-safe),
    and captured and eager steps give the same greedy tokens (batches of 1 and 3)."""
    from engine_cases import PROMPTS

    from moe_runtime.config import load_config
    from moe_runtime.engine.cuda_graphs import CudaGraphForward
    from moe_runtime.engine.llm_engine import LLMEngine
    from moe_runtime.engine.sampling_params import SamplingParams

    if scheme == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 e4m3 in Triton needs compute capability >= 8.9")
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    for prompts in ([PROMPTS[0]], list(PROMPTS[:3])):
        got = []
        for graphs in ("true", "false"):
            cfg = load_config(overrides=[f"model.path={tiny_model_dir}", "model.device=cuda", "model.dtype=bfloat16",
                                         f"model.quantization={scheme}", "cache.num_blocks=128",
                                         f"engine.cuda_graphs={graphs}", "engine.cuda_graph_max_batch=8"])
            engine = LLMEngine(cfg)
            assert isinstance(engine.executor.runner.forward, CudaGraphForward) == (graphs == "true")
            got.append([o.token_ids for o in engine.generate(prompts, greedy)])
        assert got[0] == got[1]
