"""The GPU engine's parts on the tiny model, run on CPU through the Triton interpreter (conftest.py):
the triton attention and MoE kernels give the torch backends' greedy tokens, and the CUDA-graph decode
runner's static buffers (padding rows, buckets, router counts) give the eager step's results.

On a GPU the same checks run with real graph capture (`test_graphs_match_eager_on_cuda`).
"""

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

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
TRITON = ModelParts(experts=LocalExpertsBuilder("triton"), attention="triton")
BLOCK = 4


def _tokens(tiny_model_dir, *sets: str) -> list[list[int]]:
    cfg = load_config(overrides=[f"model.path={tiny_model_dir}", "cache.num_blocks=128", "engine.seed=0", *sets])
    return [out.token_ids for out in LLMEngine(cfg).generate(list(PROMPTS), GREEDY)]


@pytest.mark.slow
def test_triton_attention_and_moe_give_the_torch_tokens(tiny_model_dir):
    """Batched prefill, chunked prefill (a 38-token prompt in 16-token chunks) and decode, fp32."""
    torch_tokens = _tokens(tiny_model_dir, "model.attention_backend=torch", "model.moe_backend=torch")
    chunked = ("engine.max_num_batched_tokens=16",)
    assert _tokens(tiny_model_dir, "model.attention_backend=triton", "model.moe_backend=triton") == torch_tokens
    triton = _tokens(tiny_model_dir, "model.attention_backend=triton", "model.moe_backend=triton", *chunked)
    assert triton == torch_tokens


class EagerReplays(CudaGraphForward):
    """`CudaGraphForward` whose "graphs" run the model eagerly on the static buffers: every other line of
    the graph runner (buckets, padding, buffer copies, router counts) runs as on a GPU."""

    def _record(self, size: int) -> Replay:
        args = self._args(size)

        def replay() -> tuple[torch.Tensor, list[torch.Tensor]]:
            hidden = self.model(*args)
            return hidden, self.model.routings()

        return replay


def _decode_step(model, kv, prompts: list[list[int]], tables: torch.Tensor) -> StepInputs:
    """One new token for each prompt, after it (whose KV is in the cache)."""
    ctx = [len(p) + 1 for p in prompts]
    slots = [int(tables[b, (c - 1) // BLOCK]) * BLOCK + (c - 1) % BLOCK for b, c in enumerate(ctx)]
    meta = AttentionMetadata(list(range(len(prompts) + 1)), ctx, torch.tensor(slots), tables)
    return StepInputs(torch.tensor([400 + b for b in range(len(prompts))]), torch.tensor(ctx) - 1, meta, True)


def _prefilled(tiny_model_dir, prompts):
    model = load_model(tiny_model_dir, dtype="float32", device="cpu", parts=TRITON)
    kv = allocate_kv_cache(model.config, 8 * len(prompts) + 8, BLOCK, model.dtype, model.device)
    tables = torch.tensor([[8 * b + j for j in range(8)] for b in range(len(prompts))])  # [B, 8]
    for b, p in enumerate(prompts):
        slots = torch.tensor([int(tables[b, i // BLOCK]) * BLOCK + i % BLOCK for i in range(len(p))])
        model(torch.tensor(p), torch.arange(len(p)), AttentionMetadata([0, len(p)], [len(p)], slots, tables[b:b + 1]), kv)
    return model, kv, tables


def test_graph_runner_buffers_give_the_eager_step(tiny_model_dir):
    """3 sequences in the 4-bucket (one padding row): the same hidden states, router counts and KV cache as
    the eager step; the padding row writes nothing and is not counted. (Values within fp32 rounding: the
    projections run on 4 rows instead of 3, which may sum in another order.)"""
    prompts = [[1, 300, 301, 302, 9], [1, 17], [1, *range(40, 52)]]
    model, kv, tables = _prefilled(tiny_model_dir, prompts)
    kv_eager = [(k.clone(), v.clone()) for k, v in kv]
    graphs = EagerReplays(model, kv, max_batch=4, table_width=8)
    assert sorted(graphs.replays) == [1, 2, 4]
    step = _decode_step(model, kv, prompts, tables)
    hidden, counts = graphs(step)
    want_hidden, want_counts = EagerForward(model, kv_eager)(_decode_step(model, kv_eager, prompts, tables))
    torch.testing.assert_close(hidden, want_hidden, atol=1e-5, rtol=0)
    assert torch.equal(counts, want_counts) and int(counts.sum()) == 3 * 2 * model.config.num_hidden_layers
    written = torch.zeros(kv[0][0].shape[:2], dtype=torch.bool).view(-1)  # [slots]
    written[step.meta.slot_mapping] = True
    for cache, cache_want in zip(kv, kv_eager, strict=True):
        for c, c_want in zip(cache, cache_want, strict=True):
            c, c_want = c.flatten(0, 1), c_want.flatten(0, 1)  # [slots, KVH, Dh]
            torch.testing.assert_close(c[written], c_want[written], atol=1e-5, rtol=0)
            assert torch.equal(c[~written], c_want[~written])  # the padding row (slot -1) wrote nowhere
    assert not graphs.applies(StepInputs(step.input_ids, step.positions, AttentionMetadata.for_prompts([1, 1, 1]), False))


@pytest.mark.gpu
def test_graphs_match_eager_on_cuda(tiny_model_dir):
    """Captured and eager decode steps give the same greedy tokens (bf16, batches of 1 and 3)."""
    for prompts in ([PROMPTS[0]], list(PROMPTS[:3])):
        got = []
        for graphs in ("true", "false"):
            cfg = load_config(overrides=[f"model.path={tiny_model_dir}", "model.device=cuda", "model.dtype=bfloat16",
                                         "cache.num_blocks=128", f"engine.cuda_graphs={graphs}",
                                         "engine.cuda_graph_max_batch=8"])
            got.append([o.token_ids for o in LLMEngine(cfg).generate(prompts, GREEDY)])
        assert got[0] == got[1]
