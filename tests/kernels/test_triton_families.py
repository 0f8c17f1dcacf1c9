"""The GPU engine's parts on the other families, run on CPU through the Triton interpreter (conftest.py): the
triton attention and MoE kernels (and top-k routing, both variants) give the torch backends' greedy
tokens, batched and chunked; the CUDA-graph runner's buffers give the eager step's hidden states and router
counts, a dense layer's row zero. On a GPU the same runs with real graph capture."""

from __future__ import annotations

import pytest
import torch
from engine_cases import PROMPTS

from moe_runtime.checkpoint.loader import load_model
from moe_runtime.config import load_config
from moe_runtime.engine.cuda_graphs import CudaGraphForward, Replay
from moe_runtime.engine.forward import EagerForward, StepInputs
from moe_runtime.engine.kv_cache import allocate_kv_cache
from moe_runtime.engine.llm_engine import LLMEngine
from moe_runtime.engine.sampling_params import SamplingParams
from moe_runtime.kernels.attention import AttentionMetadata
from moe_runtime.model.experts import LocalExpertsBuilder
from moe_runtime.model.parts import ModelParts
from moe_runtime.presets.configs import preset_config
from moe_runtime.presets.init_model import write_checkpoint

GREEDY = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
# small variants of each family (the interpreter runs every program in Python): a dense layer, q/k norms,
# biases, a shared expert, top-k renormalized and not
MODELS = {
    "qwen3-dense": ("tiny-qwen3moe", dict(num_hidden_layers=3, mlp_only_layers=[1], num_experts=16,
                                          num_experts_per_tok=4, attention_bias=True)),
    "qwen2": ("tiny-qwen2moe", dict(num_experts=12, num_experts_per_tok=4)),
    "olmoe": ("tiny-olmoe", dict(num_experts=16, num_experts_per_tok=4, num_key_value_heads=2)),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {name: write_checkpoint(tmp_path_factory.mktemp(name), preset_config(preset, **overrides), seed=0)
            for name, (preset, overrides) in MODELS.items()}


def _tokens(ckpt, *sets: str) -> list[list[int]]:
    cfg = load_config(overrides=[f"model.path={ckpt}", "cache.num_blocks=128", "engine.seed=0", *sets])
    return [out.token_ids for out in LLMEngine(cfg).generate(list(PROMPTS[:3]), GREEDY)]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_triton_attention_and_moe_give_the_torch_tokens(checkpoints, name):
    ckpt = checkpoints[name]
    want = _tokens(ckpt, "model.attention_backend=torch", "model.moe_backend=torch")
    triton = ("model.attention_backend=triton", "model.moe_backend=triton")
    assert _tokens(ckpt, *triton) == want
    assert _tokens(ckpt, *triton, "engine.max_num_batched_tokens=16") == want


class EagerReplays(CudaGraphForward):
    """`CudaGraphForward` whose "graphs" run the model eagerly on the static buffers (as in
    test_triton_engine.py)."""

    def _record(self, size: int) -> Replay:
        args = self._args(size)
        return lambda: (self.model(*args), self.model.routings())


def test_graph_runner_buffers_give_the_eager_step_with_a_dense_layer(checkpoints):
    parts = ModelParts(experts=LocalExpertsBuilder("triton"), attention="triton")
    model = load_model(checkpoints["qwen3-dense"], dtype="float32", device="cpu", parts=parts)
    prompts, block = [[1, 300, 301, 302, 9], [1, 17], [1, *range(40, 52)]], 4
    kv = allocate_kv_cache(model.config, 8 * len(prompts) + 8, block, model.dtype, model.device)
    tables = torch.tensor([[8 * b + j for j in range(8)] for b in range(len(prompts))])  # [B, 8]
    for b, p in enumerate(prompts):
        slots = torch.tensor([int(tables[b, i // block]) * block + i % block for i in range(len(p))])
        model(torch.tensor(p), torch.arange(len(p)), AttentionMetadata([0, len(p)], [len(p)], slots, tables[b:b + 1]), kv)
    kv_eager = [(k.clone(), v.clone()) for k, v in kv]

    def step(caches):
        ctx = [len(p) + 1 for p in prompts]
        slots = [int(tables[b, (c - 1) // block]) * block + (c - 1) % block for b, c in enumerate(ctx)]
        meta = AttentionMetadata(list(range(len(prompts) + 1)), ctx, torch.tensor(slots), tables)
        return StepInputs(torch.tensor([400, 401, 402]), torch.tensor(ctx) - 1, meta, True)

    hidden, counts = EagerReplays(model, kv, max_batch=4, table_width=8)(step(kv))  # 3 rows in the 4-bucket
    want_hidden, want_counts = EagerForward(model, kv_eager)(step(kv_eager))
    torch.testing.assert_close(hidden, want_hidden, atol=1e-5, rtol=0)
    assert torch.equal(counts, want_counts) and counts.shape == (3, 16)
    assert counts[1].sum() == 0 and [int(counts[l].sum()) for l in (0, 2)] == [3 * 4, 3 * 4]


@pytest.mark.gpu
@pytest.mark.parametrize("name", MODELS)
def test_graphs_match_eager_on_cuda(checkpoints, name):
    """Captured and eager decode steps give the same greedy tokens (bf16, batch of 3)."""
    got = []
    for graphs in ("true", "false"):
        got.append(_tokens(checkpoints[name], "model.device=cuda", "model.dtype=bfloat16",
                           f"engine.cuda_graphs={graphs}", "engine.cuda_graph_max_batch=8"))
    assert got[0] == got[1]
