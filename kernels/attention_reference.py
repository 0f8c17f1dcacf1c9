"""Torch references for the paged-attention kernels: the test oracle and the portable fallback.

Each function has the signature of its Triton twin (kernels/triton/paged_decode.py, paged_prefill.py,
kv_write.py, rope_kv_write.py). Attention follows `model.attention.attention` (causal, GQA, sliding window, the
flat varlen batch) but reads every context from the paged cache, computes in fp32 and rounds once to q's
dtype, as the kernels do. RoPE and RMSNorm follow the model's own rounding points, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# B sequences, W block-table width, T flat tokens, Q one sequence's new tokens, C its context,
# H query heads, KVH key/value heads, G = H // KVH query heads per KV head, Dh head dim, D hidden

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k, v), each [num_blocks, block_size, KVH, Dh]
INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class PagedBatch:
    """Where a step's B sequences sit in one layer's paged KV cache. Built once per step, shared by layers.

    Device tensors for the kernels and host ints for their grids, so that launching never syncs: a CUDA
    graph captured with one PagedBatch replays with new contents in the same tensors.
    """

    # [B, W] int32 (int64 accepted): cache block ids of sequence b's pages in order; entries past its
    # context are padding and never read.
    block_tables: torch.Tensor
    # [B] int32: tokens in sequence b's context after this step (cached + new); 0 marks a padding entry.
    context_lens: torch.Tensor
    # [B+1] int32: cumulative new-token counts; sequence b's new tokens are q rows qsl[b]:qsl[b+1] and sit
    # at positions context_lens[b] - q_len .. context_lens[b] - 1. Decode ignores it (row b = sequence b).
    query_start_loc: torch.Tensor
    # host int: an upper bound on qsl[b+1] - qsl[b]; sizes the prefill grid (decode ignores it).
    max_query_len: int
    # host int: a query at position p sees keys at positions (p - window, p]; None = all of (-inf, p].
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        tables, ctx, qsl = self.block_tables, self.context_lens, self.query_start_loc
        if tables.dim() != 2 or tables.dtype not in INDEX_DTYPES:
            raise ValueError(f"block_tables must be [B, W] int32, got {tuple(tables.shape)} {tables.dtype}")
        B = tables.shape[0]
        if tuple(ctx.shape) != (B,) or ctx.dtype not in INDEX_DTYPES:
            raise ValueError(f"context_lens must be [B={B}] int32, got {tuple(ctx.shape)} {ctx.dtype}")
        if tuple(qsl.shape) != (B + 1,) or qsl.dtype not in INDEX_DTYPES:
            raise ValueError(f"query_start_loc must be [B+1={B + 1}] int32, got {tuple(qsl.shape)} "
                             f"{qsl.dtype}")  # fmt: skip
        if not tables.device == ctx.device == qsl.device:
            raise ValueError(f"block_tables, context_lens, query_start_loc on {tables.device}, {ctx.device}, "
                             f"{qsl.device}: put them on one device")  # fmt: skip
        if self.max_query_len < 0:
            raise ValueError(f"max_query_len must be >= 0, got {self.max_query_len}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be None or >= 1, got {self.sliding_window}")

    @classmethod
    def for_decode(
        cls, block_tables: torch.Tensor, context_lens: torch.Tensor, sliding_window: int | None = None
    ) -> PagedBatch:
        """One new token per sequence: row b of q is sequence b (query_start_loc = 0, 1, .., B)."""
        B = block_tables.shape[0]
        qsl = torch.arange(B + 1, dtype=torch.int32, device=block_tables.device)
        return cls(block_tables, context_lens, qsl, max_query_len=1, sliding_window=sliding_window)

    @property
    def num_seqs(self) -> int:
        return self.block_tables.shape[0]


def check_attention_inputs(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: PagedBatch
) -> None:
    """Raise ValueError unless q [*, H, Dh], caches [num_blocks, block_size, KVH, Dh] of q's dtype and
    device, with H a multiple of KVH and unit stride along Dh, fit `batch`. Shapes only: never syncs."""
    if q.dim() != 3:
        raise ValueError(f"q must be [tokens, H, Dh], got {tuple(q.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache, v_cache must be one shape [num_blocks, block_size, KVH, Dh], "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")  # fmt: skip
    H, Dh = q.shape[1:]
    KVH = k_cache.shape[2]
    if k_cache.shape[3] != Dh or H % KVH:
        raise ValueError(f"k_cache [.., KVH={KVH}, {k_cache.shape[3]}] does not fit q's H={H}, Dh={Dh}")
    if not k_cache.dtype == v_cache.dtype == q.dtype:
        raise ValueError(f"q, k_cache, v_cache dtypes {q.dtype}, {k_cache.dtype}, {v_cache.dtype} differ")
    if not q.device == k_cache.device == v_cache.device == batch.block_tables.device:
        raise ValueError(f"q on {q.device}, caches on {k_cache.device}, {v_cache.device}, "
                         f"batch on {batch.block_tables.device}: put them on one device")  # fmt: skip
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need unit stride along Dh")


def check_kv_write_inputs(
    k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, slot_mapping: torch.Tensor
) -> None:
    """Raise ValueError unless k, v [T, KVH, Dh] fit the caches [num_blocks, block_size, KVH, Dh] (one
    dtype, one device, unit stride along Dh) and slot_mapping is [T] int32/int64. Shapes only."""
    k_cache, v_cache = kv_cache
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"k, v must be one shape [T, KVH, Dh], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"kv_cache must be two [num_blocks, block_size, {k.shape[1]}, {k.shape[2]}], "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")  # fmt: skip
    if not k.dtype == v.dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError(f"k, v, k_cache, v_cache dtypes {k.dtype}, {v.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype} differ")  # fmt: skip
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype not in INDEX_DTYPES:
        raise ValueError(f"slot_mapping must be [T={k.shape[0]}] int32 or int64, "
                         f"got {tuple(slot_mapping.shape)} {slot_mapping.dtype}")  # fmt: skip
    if not k.device == v.device == k_cache.device == v_cache.device == slot_mapping.device:
        raise ValueError("k, v, kv_cache and slot_mapping must be on one device")
    if any(x.stride(-1) != 1 for x in (k, v, k_cache, v_cache)):
        raise ValueError("k, v, k_cache and v_cache need unit stride along Dh")


def context_slots(block_table: torch.Tensor, n: int, block_size: int) -> torch.Tensor:
    """[n] int64 cache slots of one sequence's positions 0..n-1: table[j // block_size] * block_size +
    j % block_size. A slot indexes the cache flattened to [num_blocks * block_size, KVH, Dh].

    Example (block_size 4; the sequence's pages are block 7, then block 2; the 0 is padding):
        >>> context_slots(torch.tensor([7, 2, 0]), 6, block_size=4).tolist()
        [28, 29, 30, 31, 8, 9]
    """
    j = torch.arange(n, device=block_table.device)  # [n] positions
    return block_table.long()[j // block_size] * block_size + j % block_size  # [n]


def _attend_paged(
    q: torch.Tensor, kv_cache: KVCache, block_table: torch.Tensor, ctx: int, window: int | None
) -> torch.Tensor:
    """One sequence: q [Q, H, Dh] are positions ctx-Q..ctx-1; block_table [W]. Returns [Q, H, Dh] fp32."""
    k_cache, v_cache = kv_cache
    Q, H, Dh = q.shape
    if ctx == 0:
        return torch.zeros(Q, H, Dh, device=q.device)  # a padding entry attends to nothing
    G = H // k_cache.shape[2]
    slots = context_slots(block_table, ctx, k_cache.shape[1])  # [C]
    k = k_cache.flatten(0, 1)[slots].float().repeat_interleave(G, dim=1)  # [C, H, Dh]: head h reads h // G
    v = v_cache.flatten(0, 1)[slots].float().repeat_interleave(G, dim=1)  # [C, H, Dh]
    q_pos = torch.arange(ctx - Q, ctx, device=q.device)[:, None]  # [Q, 1]
    k_pos = torch.arange(ctx, device=q.device)[None, :]  # [1, C]
    visible = k_pos <= q_pos  # [Q, C] causal
    if window is not None:
        visible &= k_pos > q_pos - window  # [Q, C]
    scores = torch.einsum("qhd,chd->hqc", q.float(), k) * Dh**-0.5  # [H, Q, C]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)  # [H, Q, C]
    return torch.einsum("hqc,chd->qhd", probs, v)  # [Q, H, Dh]


def paged_attention_decode_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: PagedBatch
) -> torch.Tensor:
    """One new token per sequence: q [B, H, Dh] (row b at position context_lens[b] - 1) attends to its
    paged context in k_cache, v_cache [num_blocks, block_size, KVH, Dh]. Returns [B, H, Dh] in q's dtype;
    rows of padding entries (context_lens[b] == 0) are zero. Reads `batch.query_start_loc` not at all.
    """
    check_attention_inputs(q, k_cache, v_cache, batch)
    if q.shape[0] != batch.num_seqs:
        raise ValueError(f"q has {q.shape[0]} rows for {batch.num_seqs} sequences: decode takes one each")
    out = torch.empty_like(q)  # [B, H, Dh]
    for b, ctx in enumerate(batch.context_lens.tolist()):
        o = _attend_paged(q[b : b + 1], (k_cache, v_cache), batch.block_tables[b], ctx, batch.sliding_window)
        out[b] = o[0].to(q.dtype)  # one rounding
    return out


def paged_attention_prefill_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: PagedBatch
) -> torch.Tensor:
    """Causal varlen attention of a flat batch over the paged cache (new keys already written to it).

    q [T, H, Dh]: sequence b's new tokens are rows qsl[b]:qsl[b+1] at positions context_lens[b] - q_len ..
    context_lens[b] - 1; they attend to every cached and new key up to their own position (within the
    sliding window). Returns [T, H, Dh] in q's dtype; rows past qsl[B] (graph padding) are zero.
    """
    check_attention_inputs(q, k_cache, v_cache, batch)
    out = torch.zeros_like(q)  # [T, H, Dh]
    qsl = batch.query_start_loc.tolist()
    for b, ctx in enumerate(batch.context_lens.tolist()):
        start, end = qsl[b], qsl[b + 1]
        if end - start > ctx:
            raise ValueError(f"sequence {b} has {end - start} new tokens but context_lens[{b}] = {ctx}")
        o = _attend_paged(q[start:end], (k_cache, v_cache), batch.block_tables[b], ctx, batch.sliding_window)
        out[start:end] = o.to(q.dtype)  # one rounding
    return out


def kv_write_reference(
    k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, slot_mapping: torch.Tensor
) -> None:
    """Copy k, v [T, KVH, Dh] into the caches [num_blocks, block_size, KVH, Dh] at slot_mapping [T] (int32
    or int64; slot = block * block_size + offset); rows with slot < 0 are padding and skipped.

    Example (block_size 2: slot 3 is block 1, offset 1; the second row is padding):
        >>> kc, vc = torch.zeros(2, 2, 1, 1), torch.zeros(2, 2, 1, 1)  # [num_blocks, block_size, KVH, Dh]
        >>> k, v = torch.tensor([5.0, 6.0]).view(2, 1, 1), torch.ones(2, 1, 1)  # [T, KVH, Dh]
        >>> kv_write_reference(k, v, (kc, vc), slot_mapping=torch.tensor([3, -1]))
        >>> kc.flatten().tolist()
        [0.0, 0.0, 0.0, 5.0]
    """
    check_kv_write_inputs(k, v, kv_cache, slot_mapping)
    k_cache, v_cache = kv_cache
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0  # [T]
    slots = slot_mapping[keep].long()  # [n]
    k_cache[slots // block_size, slots % block_size] = k[keep]  # [n, KVH, Dh]
    v_cache[slots // block_size, slots % block_size] = v[keep]


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in x's dtype, each product and the sum rounded as torch rounds them (the model's
    `apply_rotary`): x [T, heads, Dh]; cos, sin [T, Dh] -> [T, heads, Dh]."""
    x1, x2 = x.chunk(2, dim=-1)  # [T, heads, Dh/2] each
    rotated = torch.cat((-x2, x1), dim=-1)  # [T, heads, Dh]
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def rope_kv_write_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    kv_cache: KVCache,
    slot_mapping: torch.Tensor,
) -> None:
    """RoPE on q [T, H, Dh] and k [T, KVH, Dh] in place with rope = (cos, sin) [T, Dh] in their dtype,
    then `kv_write_reference(k, v, kv_cache, slot_mapping)` with the rotated k."""
    cos, sin = rope
    q.copy_(rope_reference(q, cos, sin))
    k.copy_(rope_reference(k, cos, sin))
    kv_write_reference(k, v, kv_cache, slot_mapping)
