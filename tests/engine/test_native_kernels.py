"""`model.exact`: the engine's CPU fast paths for 16-bit weights (native kernels, fp32 decode attention,
fp32 weight copies) or none.

exact=true: the model computes exactly what `load_model` gives (torch's kernels; the parity tests with
transformers hold it to bit-identical bf16 logits). exact=false (the default): 16-bit linears of a few
rows and small expert groups run the native kernels (kernels/cpu) and decode attention runs in fp32
matmuls. They round where torch rounds but sum in another order, so logits move by a few bf16 ulps:
atol 0.1 on logits of order 1 (as tests/engine/test_fp32_copies.py for the fp32 copies), and each greedy
token of a fast bf16 engine is the exact model's argmax within TIE_ATOL.
"""

from __future__ import annotations

import pytest
import torch

from moe_runtime.checkpoint.loader import load_model
from moe_runtime.config import ModelLoadConfig, load_config
from moe_runtime.engine.parts import choose_kernels
from moe_runtime.engine.sampling_params import SamplingParams
from moe_runtime.errors import ConfigError
from moe_runtime.kernels.attention import AttentionMetadata
from moe_runtime.kernels.linear import DEFAULT_PLAN, CpuLinear, TorchLinear
from moe_runtime.model.experts import LocalExpertsBuilder
from moe_runtime.model.parts import ModelParts

HAS_AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


TIE_ATOL = 0.07  # about two bf16 ulps of logits of order 8, as tests/test_generate_parity.py


def _logits(model, n: int) -> torch.Tensor:
    return _forward_logits(model, list(range(3, 3 + n)))


def test_exact_is_a_checked_bool():
    assert load_config().model.exact is False
    assert load_config(overrides=["model.exact=true"]).model.exact is True
    with pytest.raises(ConfigError, match=r"model.exact='maybe': .*boolean"):
        load_config(overrides=["model.exact=maybe"])


@pytest.mark.skipif(not HAS_AVX2, reason="the native CPU kernels run only on AVX2 CPUs")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_native_logits_close_to_torch(tiny_model_dir, dtype):
    exact = load_model(tiny_model_dir, dtype=dtype, device="cpu")
    fast = load_model(tiny_model_dir, dtype=dtype, device="cpu", parts=_fast_parts(dtype))
    assert isinstance(fast.lm_head.kernel, CpuLinear) and fast.layers[0].block_sparse_moe.experts.backend == "cpu"
    for n in (1, 5, DEFAULT_PLAN.max_rows("native")):
        got, want = _logits(fast, n), _logits(exact, n)
        assert not torch.equal(got, want)  # the native path ran: other summation order
        torch.testing.assert_close(got, want, atol=0.1, rtol=0)


def test_fp32_weights_stay_on_torch():
    kernels = choose_kernels(ModelLoadConfig(exact=False), torch.device("cpu"), torch.float32)
    assert (kernels.attention, kernels.norm, kernels.linear, kernels.moe) == ("torch",) * 4
    assert not kernels.native_decode and not kernels.huge_pages


def _fast_parts(dtype: str) -> ModelParts:
    """The parts the engine gives a 16-bit model on this CPU with model.exact: false."""
    kernels = choose_kernels(ModelLoadConfig(exact=False), torch.device("cpu"), getattr(torch, dtype))
    assert kernels.native_decode  # the native kernels built here (HAS_AVX2)
    return ModelParts(experts=LocalExpertsBuilder(kernels.moe), attention=kernels.attention,
                      linear=kernels.linear, norm=kernels.norm)


@pytest.mark.skipif(not HAS_AVX2, reason="the native CPU kernels run only on AVX2 CPUs")
def test_engine_switch(make_engine, tiny_model_dir):
    """Each engine sets up its fast paths or not; the fast engine's greedy tokens are the exact model's
    argmax within TIE_ATOL, teacher-forced (bf16 near-ties of a random tiny model may flip either way)."""
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [[1, 300, 301, 302], [1, *range(40, 60)], [1, 17]]
    for exact in (True, False):
        engine = make_engine(model__dtype="bfloat16", model__exact=exact)
        model = engine.executor.model
        assert isinstance(model.lm_head.kernel, TorchLinear if exact else CpuLinear)
        assert model.layers[0].block_sparse_moe.experts.backend == ("torch" if exact else "cpu")
    reference = load_model(tiny_model_dir, dtype="bfloat16", device="cpu")
    for prompt, out in zip(prompts, engine.generate(prompts, params), strict=True):
        ids = prompt + out.token_ids[:-1]
        logits = _forward_logits(reference, ids)[len(prompt) - 1 :]  # [12, V]
        chosen = logits.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
        assert (logits.max(dim=1).values - chosen).max() <= TIE_ATOL


def _forward_logits(model, ids: list[int]) -> torch.Tensor:
    h = model(torch.tensor(ids), torch.arange(len(ids)), AttentionMetadata.for_prompts([len(ids)]))
    return model.compute_logits(h)
