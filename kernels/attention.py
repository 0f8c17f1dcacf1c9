"""Attention over a step's flat batch of sequences and the paged KV cache: one API, backends chosen once.

A step's tokens are flat: sequence b owns rows `query_start_loc[b]:query_start_loc[b+1]` of q/k/v and has
`context_lens[b]` tokens in its context after this step (cached + new), so its new tokens sit at positions
`context_lens[b] - q_len .. context_lens[b] - 1`. Without a cache every sequence is a whole prompt. The KV
cache of one layer is a pair of tensors [num_blocks, block_size, KVH, Dh]; token j of sequence b lives in
slot `block_tables[b][j // block_size] * block_size + j % block_size`.

A backend (`make_attention(name, sliding_window)`) is called as `attend(q, k, v, rope, meta, kv_cache)`:
it applies RoPE to q and k, writes k and v into the cache, and returns causal GQA attention [T, H, Dh].
    torch   torch's SDPA in the activation dtype: the reference implementation's arithmetic
    cpu     torch's SDPA for prompts, fp32 matmuls for one-token queries (decode on CPUs)
    triton  RoPE fused with the cache write, then the paged decode / varlen prefill kernels (GPU)
Which one runs is the caller's choice, made once (the engine picks by device; none is picked here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from moe_runtime.kernels.attention_reference import KVCache, PagedBatch, rope_reference
from moe_runtime.kernels.torch_attention import attention, attention_fp32

# B sequences, T flat tokens, H query heads, KVH key/value heads, Dh head dim

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each [T, Dh] in the activation dtype


@dataclass(frozen=True)
class AttentionMetadata:
    """What attention needs to know about a step's flat batch. Built once per step by the model runner."""

    # [B+1] host ints: cumulative new-token counts; sequence b's new tokens are rows qsl[b]:qsl[b+1].
    query_start_loc: list[int]
    # [B] host ints: tokens in sequence b's context after this step (cached + new).
    context_lens: list[int]
    # [T] int64 (int32 accepted by the triton backend): flat KV slot of each new token; < 0 skips the
    # write (padding rows of a captured graph). None when running without a cache.
    slot_mapping: torch.Tensor | None = None
    # [B, max_blocks] int64: KV block ids of each sequence, padded; None without a cache.
    block_tables: torch.Tensor | None = None
    # The same batch as device int32 tensors for the triton kernels. The runner sets it when it has the
    # tensors already (static buffers of a CUDA graph); otherwise `paged()` builds it once per step.
    paged_batch: PagedBatch | None = None
    # Per-step scratch the backends fill on the first layer and reuse in the others (not compared).
    memo: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def for_prompts(cls, prompt_lens: list[int]) -> AttentionMetadata:
        """Metadata for whole prompts run without a KV cache (parity tests, one-shot scoring)."""
        qsl = [0]
        for n in prompt_lens:
            qsl.append(qsl[-1] + n)
        return cls(query_start_loc=qsl, context_lens=list(prompt_lens))

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @property
    def max_query_len(self) -> int:
        qsl = self.query_start_loc
        return max((qsl[b + 1] - qsl[b] for b in range(len(qsl) - 1)), default=0)

    def paged(self) -> PagedBatch:
        """This batch as a `PagedBatch` on the block tables' device (int32), built once per step."""
        if self.paged_batch is not None:
            return self.paged_batch
        if "paged" not in self.memo:
            dev = self.block_tables.device
            self.memo["paged"] = PagedBatch(
                block_tables=self.block_tables.to(torch.int32),
                context_lens=torch.tensor(self.context_lens, dtype=torch.int32, device=dev),
                query_start_loc=torch.tensor(self.query_start_loc, dtype=torch.int32, device=dev),
                max_query_len=self.max_query_len,
            )
        return self.memo["paged"]


class AttentionBackend(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: Rope, meta: AttentionMetadata,
                 kv_cache: KVCache | None) -> torch.Tensor:
        """q [T, H, Dh], k, v [T, KVH, Dh] not yet rotated -> attention [T, H, Dh] in q's dtype."""


class TorchAttention:
    """RoPE as the reference implementation computes it, the cache write, and SDPA (`torch_attention`)."""

    def __init__(self, sliding_window: int | None):
        self.sliding_window = sliding_window

    def __call__(self, q, k, v, rope: Rope, meta: AttentionMetadata, kv_cache: KVCache | None) -> torch.Tensor:
        q, k = rope_reference(q, *rope), rope_reference(k, *rope)
        return attention(q, k, v, meta, kv_cache, self.sliding_window)


class CpuAttention(TorchAttention):
    """`TorchAttention` with one-token queries in fp32 matmuls (`attention_fp32`): decode on CPUs."""

    def __call__(self, q, k, v, rope: Rope, meta: AttentionMetadata, kv_cache: KVCache | None) -> torch.Tensor:
        q, k = rope_reference(q, *rope), rope_reference(k, *rope)
        return attention_fp32(q, k, v, meta, kv_cache, self.sliding_window)


class TritonAttention:
    """RoPE fused with the cache write, then one paged-attention launch for the whole batch: the decode
    kernel when every sequence adds one token, else the varlen prefill kernel (chunks and decodes mixed).
    Without a cache (whole prompts, one-shot scoring) it is `TorchAttention`."""

    def __init__(self, sliding_window: int | None):
        self.sliding_window = sliding_window
        self._no_cache = TorchAttention(sliding_window)

    def __call__(self, q, k, v, rope: Rope, meta: AttentionMetadata, kv_cache: KVCache | None) -> torch.Tensor:
        if kv_cache is None:
            return self._no_cache(q, k, v, rope, meta, kv_cache)
        from moe_runtime.kernels.triton.paged_decode import paged_attention_decode  # lazy: see backends.py
        from moe_runtime.kernels.triton.paged_prefill import paged_attention_prefill
        from moe_runtime.kernels.triton.rope_kv_write import rope_kv_write

        rope_kv_write(q, k, v, rope, kv_cache, meta.slot_mapping)  # q, k rotated in place
        batch = meta.paged()
        if self.sliding_window is not None:
            batch = PagedBatch(batch.block_tables, batch.context_lens, batch.query_start_loc, batch.max_query_len,
                               self.sliding_window)
        if batch.max_query_len == 1 and q.shape[0] == batch.num_seqs:
            return paged_attention_decode(q, *kv_cache, batch)  # [B, H, Dh]
        return paged_attention_prefill(q, *kv_cache, batch)  # [T, H, Dh]


ATTENTION_BACKENDS = {"torch": TorchAttention, "cpu": CpuAttention, "triton": TritonAttention}


class UnknownAttentionBackendError(ValueError):
    """An attention backend name outside `ATTENTION_BACKENDS`."""


def make_attention(name: str, sliding_window: int | None) -> AttentionBackend:
    """The attention backend `name` for a layer with this sliding window (None: full causal attention)."""
    try:
        return ATTENTION_BACKENDS[name](sliding_window)
    except KeyError:
        raise UnknownAttentionBackendError(
            f"attention_backend={name!r} is not known; allowed: {sorted(ATTENTION_BACKENDS)}"
        ) from None
