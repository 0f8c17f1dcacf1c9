"""Triton paged prefill attention vs `paged_attention_prefill_reference`, and the reference vs the model.

CPU (interpreter): fp32 within 1e-5 and fp16 within 2e-3 (atol and rtol: the kernel rounds the softmax
weights to fp16 before the value product, the reference does not; about 2 fp16 ulps of an O(1) output).
GPU: bf16 within 2e-2 of the fp32 reference, and replay under CUDA-graph capture.
"""

import pytest
import torch
from paged_attention_cases import PagedCase, PagedInputs, make_inputs, model_step

from moe_runtime.kernels.attention_reference import PagedBatch, paged_attention_prefill_reference
from moe_runtime.kernels.torch_attention import attention
from moe_runtime.kernels.triton.paged_prefill import paged_attention_prefill

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])

# (name, context lens after the step, new tokens, (H, KVH), Dh, block size, window, shared pages)
CASES = (
    PagedCase("prompts_gqa1", (5, 33), (5, 33), (4, 4), 64, 16),
    # chunks starting mid-block (27, 40 with blocks of 16) and crossing block boundaries
    PagedCase("chunks_mid_block_gqa4", (40, 70), (13, 30), (8, 2), 128, 16),
    # decode rows, a chunk over a cached context and a whole prompt in one batch
    PagedCase("mixed_decode_gqa8", (17, 2, 50, 9), (1, 1, 34, 9), (8, 1), 128, 8),
    PagedCase("padding_entries", (0, 20, 0), (0, 6, 0), (8, 2), 64, 16),
    PagedCase("gqa3_d80_window", (12, 30), (12, 30), (6, 2), 80, 8, window=3),  # G, Dh not powers of 2
    PagedCase("window_chunk", (100, 37), (70, 20), (8, 1), 64, 16, window=50),
    PagedCase("shared_prefix", (48, 40), (8, 8), (4, 1), 64, 16, shared=2),  # 32 tokens in common
    PagedCase("long_4096", (4096,), (40,), (4, 1), 128, 16),
    PagedCase("long_window", (2048, 1), (64, 1), (2, 2), 128, 16, window=512),
)
MODEL_CASES = (
    # first prompt chunks (nothing cached), a later chunk, and two decode rows: every path of `attention`
    PagedCase("model_mixed", (6, 40, 17, 33), (6, 13, 1, 1), (8, 2), 64, 16),
    PagedCase("model_window", (30, 50, 9), (30, 20, 1), (8, 1), 128, 8, window=7),
)


@DTYPES
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_reference(case, dtype):
    x = make_inputs(case, dtype, DEVICE, padding_rows=3)
    got = paged_attention_prefill(x.q, x.k_cache, x.v_cache, x.batch)
    want = paged_attention_prefill_reference(x.q, x.k_cache, x.v_cache, x.batch)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
    assert torch.equal(got[-3:], torch.zeros_like(got[-3:]))  # graph padding rows: zeros


@DTYPES
@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda c: c.name)
def test_reference_matches_model_attention(case, dtype):
    """The reference reads the cache that the model's `attention` (SDPA) wrote the new k, v into."""
    x = make_inputs(case, dtype, "cpu")
    meta, (k, v) = model_step(x, case, dtype)
    cache = (x.k_cache.clone(), x.v_cache.clone())
    model_out = attention(x.q, k, v, meta, cache, case.window)
    want = paged_attention_prefill_reference(x.q, *cache, x.batch)
    torch.testing.assert_close(want.float(), model_out.float(), **TOL[dtype])


def test_int64_index_tensors_give_the_same_result():
    """The model's metadata holds int64 tables; the kernel takes them as they are."""
    x = make_inputs(CASES[2], torch.float32, DEVICE)
    b = x.batch
    wide = PagedBatch(b.block_tables.long(), b.context_lens.long(), b.query_start_loc.long(), b.max_query_len)
    got = paged_attention_prefill(x.q, x.k_cache, x.v_cache, wide)
    assert torch.equal(got, paged_attention_prefill(x.q, x.k_cache, x.v_cache, b))


def test_rejects_mismatched_heads():
    x = make_inputs(CASES[0], torch.float32, DEVICE)
    with pytest.raises(ValueError, match="KVH"):
        paged_attention_prefill(x.q[:, :3], x.k_cache, x.v_cache, x.batch)
    with pytest.raises(ValueError, match="dtypes"):
        paged_attention_prefill(x.q.half(), x.k_cache, x.v_cache, x.batch)


# -----------------------------------------------------------
# GPU: bf16 at serving shapes, and CUDA-graph replay with new sequences in the captured tensors.

GPU_CASES = CASES + (
    PagedCase("mixtral_prompts", (2048, 512, 1), (2048, 512, 1), (32, 8), 128, 16),
    PagedCase("mixtral_chunked", (8192, 300, 4100), (512, 1, 100), (32, 8), 128, 16, window=4096),
)


def fp32_reference(x: PagedInputs) -> torch.Tensor:
    f = torch.float32
    return paged_attention_prefill_reference(x.q.to(f), x.k_cache.to(f), x.v_cache.to(f), x.batch)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)
def test_bf16_on_gpu(case):
    x = make_inputs(case, torch.bfloat16, "cuda")
    got = paged_attention_prefill(x.q, x.k_cache, x.v_cache, x.batch)
    torch.testing.assert_close(got.float(), fp32_reference(x), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_cuda_graph_replay_with_new_sequences():
    case = PagedCase("graph", (600, 64, 9), (64, 64, 1), (32, 8), 128, 16)
    x = make_inputs(case, torch.bfloat16, "cuda")
    paged_attention_prefill(x.q, x.k_cache, x.v_cache, x.batch)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_attention_prefill(x.q, x.k_cache, x.v_cache, x.batch)
    # same T and max_query_len bound, new split of the rows: 1 decode row, a 64-token chunk, 40 tokens
    x.batch.query_start_loc.copy_(torch.tensor([0, 1, 65, 105], dtype=torch.int32))
    x.batch.context_lens.copy_(torch.tensor([500, 64, 40], dtype=torch.int32))
    graph.replay()
    torch.testing.assert_close(out[:105].float(), fp32_reference(x)[:105], atol=2e-2, rtol=2e-2)
