"""Triton paged decode attention vs `paged_attention_decode_reference`, and the reference vs the model.

CPU (interpreter): fp32 within 1e-5 and fp16 within 2e-3 (atol and rtol: the kernel rounds the softmax
weights to fp16 before the value product, the reference does not; about 2 fp16 ulps of an O(1) output).
GPU: bf16 within 2e-2 of the fp32 reference, and replay under CUDA-graph capture.
"""

import doctest

import pytest
import torch
from paged_attention_cases import PagedInputs, decode_case, make_inputs, model_step

from moe_runtime.kernels import attention_reference
from moe_runtime.kernels.attention_reference import PagedBatch, paged_attention_decode_reference
from moe_runtime.kernels.torch_attention import attention
from moe_runtime.kernels.triton import paged_decode
from moe_runtime.kernels.triton.paged_decode import GPU_TILES, num_splits, paged_attention_decode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}

# (name, context lens, (H, KVH), Dh, block size, window, shared pages); 0 = padding entry
CASES = (
    decode_case("gqa1_d64", (1, 5, 17, 33), (4, 4), 64, 16),
    decode_case("gqa4_d128", (7, 16, 100), (8, 2), 128, 16),
    decode_case("gqa8_d128", (3, 64, 200), (8, 1), 128, 8),
    decode_case("gqa3_d80", (12, 30), (6, 2), 80, 8),  # G and Dh not powers of 2
    decode_case("padded", (0, 9, 0, 40), (8, 2), 64, 16),
    decode_case("window", (9, 100, 40), (8, 2), 64, 8, window=7),
    decode_case("window_long", (1000, 5), (4, 1), 128, 16, window=300),
    decode_case("shared_prefix", (40, 45), (4, 1), 64, 16, shared=2),
    decode_case("long_4096", (4096, 3), (4, 1), 128, 16),  # the short one leaves its later splits empty
)
MODEL_CASES = (
    decode_case("model_gqa4", (5, 17, 33), (8, 2), 64, 16),
    decode_case("model_window", (9, 100, 40), (8, 1), 128, 8, window=7),
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_reference(case, dtype):
    x = make_inputs(case, dtype, DEVICE)
    got = paged_attention_decode(x.q, x.k_cache, x.v_cache, x.batch)
    want = paged_attention_decode_reference(x.q, x.k_cache, x.v_cache, x.batch)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
    padding = torch.tensor(case.ctx, device=DEVICE) == 0
    assert torch.equal(got[padding], torch.zeros_like(got[padding]))  # zeros, not NaN


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda c: c.name)
def test_reference_matches_model_attention(case, dtype):
    """The reference reads the cache that the model's `attention` (SDPA) wrote its new k, v into."""
    x = make_inputs(case, dtype, "cpu")
    meta, (k, v) = model_step(x, case, dtype)
    cache = (x.k_cache.clone(), x.v_cache.clone())
    model_out = attention(x.q, k, v, meta, cache, case.window)
    want = paged_attention_decode_reference(x.q, *cache, x.batch)
    torch.testing.assert_close(want.float(), model_out.float(), **TOL[dtype])


def test_splits_cover_the_table_and_depend_on_shapes_only():
    for capacity in (1, 16, 1000, 4096, 1 << 17):
        for programs in (1, 8, 64, 4096):
            s = num_splits(capacity, programs, num_sms=132, tiles=GPU_TILES)
            assert 1 <= s.count <= paged_decode.MAX_SPLITS
            assert s.keys % GPU_TILES.block_n == 0
            assert (s.count - 1) * s.keys < capacity <= s.count * s.keys  # none wholly past the table


def test_rejects_mismatched_rows():
    x = make_inputs(CASES[0], torch.float32, DEVICE)
    with pytest.raises(ValueError, match="q has"):
        paged_attention_decode(x.q[:2], x.k_cache, x.v_cache, x.batch)
    with pytest.raises(ValueError, match="k_cache"):
        paged_attention_decode(x.q, x.k_cache[..., :32], x.v_cache[..., :32], x.batch)


def test_doctests():
    assert doctest.testmod(attention_reference).failed == 0
    assert doctest.testmod(paged_decode).failed == 0


def test_padded_batch_builds_for_decode():
    tables = torch.zeros(3, 2, dtype=torch.int32)
    batch = PagedBatch.for_decode(tables, torch.tensor([0, 4, 9], dtype=torch.int32), sliding_window=4)
    assert batch.query_start_loc.tolist() == [0, 1, 2, 3] and batch.max_query_len == 1
    with pytest.raises(ValueError, match="context_lens"):
        PagedBatch.for_decode(tables, torch.tensor([1, 2], dtype=torch.int32))


# -----------------------------------------------------------
# GPU: bf16 at serving shapes, and CUDA-graph replay with new contexts in the captured tensors.

GPU_CASES = CASES + (
    decode_case("mixtral_b64", tuple(range(1, 8192, 128)), (32, 8), 128, 16),
    decode_case("mixtral_b4_window", (4096, 9000, 1, 0), (32, 8), 128, 16, window=4096),
)


def fp32_reference(x: PagedInputs) -> torch.Tensor:
    f = torch.float32
    return paged_attention_decode_reference(x.q.to(f), x.k_cache.to(f), x.v_cache.to(f), x.batch)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)
def test_bf16_on_gpu(case):
    x = make_inputs(case, torch.bfloat16, "cuda")
    got = paged_attention_decode(x.q, x.k_cache, x.v_cache, x.batch)
    torch.testing.assert_close(got.float(), fp32_reference(x), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_cuda_graph_replay_with_new_contexts():
    case = decode_case("graph", (300, 4000, 17, 1), (32, 8), 128, 16)
    x = make_inputs(case, torch.bfloat16, "cuda")
    paged_attention_decode(x.q, x.k_cache, x.v_cache, x.batch)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_attention_decode(x.q, x.k_cache, x.v_cache, x.batch)
    x.batch.context_lens.copy_(torch.tensor([1, 17, 0, 4000], dtype=torch.int32))  # same table width
    x.q.copy_(torch.randn_like(x.q))
    graph.replay()
    want = fp32_reference(x)
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
