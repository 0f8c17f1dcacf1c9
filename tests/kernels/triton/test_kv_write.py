"""Triton KV write and RoPE + KV write: exact equality with the references and with the model.

A copy must be exact, and RoPE must equal the torch attention backend's RoPE (`rope_reference`, the
reference implementation's arithmetic) bit for bit in fp32 and fp16 (the
kernel keeps torch's rounding points and fuses no multiply into an add).
"""

import pytest
import torch

from moe_runtime.kernels.attention import AttentionMetadata
from moe_runtime.kernels.attention_reference import kv_write_reference, rope_kv_write_reference
from moe_runtime.kernels.attention_reference import rope_reference as apply_rotary
from moe_runtime.kernels.torch_attention import attention
from moe_runtime.kernels.triton.kv_write import kv_write
from moe_runtime.kernels.triton.rope_kv_write import rope_kv_write
from moe_runtime.model.layers import RotaryEmbedding

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])

# (T, H, KVH, Dh, block size, slot dtype); every case has padding rows (slot < 0)
CASES = (
    (1, 4, 4, 64, 16, torch.int64),
    (33, 8, 2, 128, 16, torch.int32),
    (17, 32, 8, 128, 8, torch.int64),
    (9, 6, 2, 80, 4, torch.int32),  # heads and Dh not powers of 2
)


def make_step(case, dtype, device=DEVICE):
    """Fused qkv activations (q, k, v are strided views of one [T, (H + 2 KVH) * Dh] buffer, as a fused
    projection gives them), caches, and distinct shuffled slots with every third row padding."""
    T, H, KVH, Dh, bs, slot_dtype = case
    gen = torch.Generator().manual_seed(T * 1000 + Dh)
    qkv = torch.randn(T, (H + 2 * KVH) * Dh, generator=gen).to(dtype).to(device)
    q, k, v = qkv.split([H * Dh, KVH * Dh, KVH * Dh], dim=-1)
    q, k, v = q.view(T, H, Dh), k.view(T, KVH, Dh), v.view(T, KVH, Dh)
    num_blocks = -(-T // bs) + 2
    cache = torch.randn(2, num_blocks, bs, KVH, Dh, generator=gen).to(dtype).to(device)
    slots = torch.randperm(num_blocks * bs, generator=gen)[:T]
    slots[::3] = -1
    cos, sin = RotaryEmbedding(Dh, 1e6)(torch.randint(0, 32768, (T,), generator=gen), dtype)
    return (q, k, v), (cache[0], cache[1]), slots.to(slot_dtype).to(device), (cos.to(device), sin.to(device))


@DTYPES
@pytest.mark.parametrize("case", CASES, ids=str)
def test_kv_write_matches_reference_exactly(case, dtype):
    (_, k, v), cache, slots, _ = make_step(case, dtype)
    want = tuple(c.clone() for c in cache)
    kv_write(k, v, cache, slots)
    kv_write_reference(k, v, want, slots)
    assert torch.equal(cache[0], want[0]) and torch.equal(cache[1], want[1])


@DTYPES
@pytest.mark.parametrize("case", CASES, ids=str)
def test_rope_kv_write_matches_the_model_bit_for_bit(case, dtype):
    (q, k, v), cache, slots, rope = make_step(case, dtype)
    q_want, k_want = apply_rotary(q, *rope), apply_rotary(k, *rope)  # the model's RoPE
    kv_write_reference(k_want, v, cache, slots)
    for fn in (rope_kv_write, rope_kv_write_reference):
        (q_got, k_got, v), cache_got, slots, rope = make_step(case, dtype)  # fresh views of one qkv buffer
        fn(q_got, k_got, v, rope, cache_got, slots)
        assert torch.equal(q_got, q_want) and torch.equal(k_got, k_want), fn.__name__
        assert torch.equal(cache_got[0], cache[0]) and torch.equal(cache_got[1], cache[1]), fn.__name__


@DTYPES
def test_reference_matches_the_models_cache_write(dtype):
    """`attention` writes the new k, v into the cache itself (index_copy_); the reference writes the same."""
    T, H, KVH, Dh, bs = 5, 4, 2, 64, 4
    (q, k, v), cache, _, _ = make_step((T, H, KVH, Dh, bs, torch.int64), dtype, "cpu")
    slots = torch.tensor([9, 2, 3, 4, 13])  # sequence 0: 1 token; sequence 1: 4 tokens, blocks 0 then 3
    meta = AttentionMetadata([0, 1, 5], [3, 4], slots, torch.tensor([[1, 2], [0, 3]]))
    model_cache = tuple(c.clone() for c in cache)
    attention(q, k, v, meta, model_cache)
    kv_write_reference(k, v, cache, slots)
    assert torch.equal(cache[0], model_cache[0]) and torch.equal(cache[1], model_cache[1])


def test_rejects_bad_slot_mapping():
    (_, k, v), cache, slots, _ = make_step(CASES[1], torch.float32)
    with pytest.raises(ValueError, match="slot_mapping"):
        kv_write(k, v, cache, slots[:-1])
    with pytest.raises(ValueError, match="slot_mapping"):
        kv_write(k, v, cache, slots.float())


# -----------------------------------------------------------
# GPU: bf16, where torch rounds RoPE's products the same way (fp32 arithmetic, one rounding each).

GPU_CASES = CASES + ((4096, 32, 8, 128, 16, torch.int64),)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_bf16_on_gpu(case):
    (q, k, v), cache, slots, (cos, sin) = make_step(case, torch.bfloat16, "cuda")
    q_want, k_want = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    want = tuple(c.clone() for c in cache)
    kv_write_reference(k_want, v, want, slots)
    rope_kv_write(q, k, v, (cos, sin), cache, slots)
    assert torch.equal(q, q_want) and torch.equal(k, k_want)
    assert torch.equal(cache[0], want[0]) and torch.equal(cache[1], want[1])
