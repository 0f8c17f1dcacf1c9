"""Attention with torch's ops over a flat batch of sequences and an optional paged KV cache: the backends
`torch` (SDPA throughout, the reference implementation's arithmetic) and `cpu` (decode rows in fp32).

The batch layout and the cache layout are `kernels.attention`'s. Prompts (and prompt chunks) attend one
sequence at a time; every sequence that adds one token to a cached context attends in one batched call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from moe_runtime.kernels.attention_reference import KVCache

if TYPE_CHECKING:  # a cycle at run time: kernels.attention builds its backends from these functions
    from moe_runtime.kernels.attention import AttentionMetadata

# B sequences, T flat tokens, H query heads, KVH key/value heads, Dh head dim, C context tokens


@dataclass(frozen=True)
class DecodeBatch:
    """Sequences that add one token to a cached context: one padded, masked SDPA call per layer."""

    seqs: list[int]  # [Bd] their indices in the step's batch
    rows: torch.Tensor  # [Bd] int64: their rows in the flat batch
    tables: torch.Tensor  # [Bd, W] int64: block tables trimmed to the longest context
    context_lens: torch.Tensor  # [Bd] int64
    valid: torch.Tensor  # [Bd, 1, 1, C] bool, C = W * block_size: key position < context length




def decode_batch(meta: AttentionMetadata, block_size: int) -> DecodeBatch | None:
    """The sequences with exactly one new token and a cached context, batched for one SDPA call.

    Built on the first layer's call and reused by the others (the metadata is shared by every layer of a
    step). None without a cache or when fewer than two sequences decode.
    """
    key = ("decode_batch", block_size)
    if key not in meta.memo:
        meta.memo[key] = _make_decode_batch(meta, block_size)
    return meta.memo[key]


def _make_decode_batch(meta: AttentionMetadata, block_size: int) -> DecodeBatch | None:
    if meta.block_tables is None:
        return None
    qsl = meta.query_start_loc
    seqs = [b for b in range(meta.num_seqs) if qsl[b + 1] - qsl[b] == 1 and meta.context_lens[b] > 1]
    if len(seqs) < 2:
        return None
    ctx = [meta.context_lens[b] for b in seqs]
    width = -(-max(ctx) // block_size)
    dev = meta.block_tables.device
    index = torch.tensor(seqs, device=dev)
    ctx_t = torch.tensor(ctx, device=dev)
    key_pos = torch.arange(width * block_size, device=dev)  # [C]
    return DecodeBatch(
        seqs=seqs,
        rows=torch.tensor([qsl[b] for b in seqs], device=dev),
        tables=meta.block_tables[index, :width],
        context_lens=ctx_t,
        valid=(key_pos[None, :] < ctx_t[:, None])[:, None, None, :],  # [Bd, 1, 1, C]
    )




def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    kv_cache: KVCache | None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal GQA attention for each sequence of the flat batch, scale 1/sqrt(Dh).

    q: [T, H, Dh]; k, v: [T, KVH, Dh] (already rotated). Writes k, v into `kv_cache` at
    `meta.slot_mapping` first when a cache is given. Returns [T, H, Dh]. Torch's SDPA in the activation
    dtype throughout: the reference implementation's arithmetic.
    """
    return _attention(q, k, v, meta, kv_cache, _Attend(sliding_window, _attend_one, _attend_decode))


def attention_fp32(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    kv_cache: KVCache | None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """`attention` with one-token queries (decode) as plain fp32 matmuls, rounded once to q's dtype.

    Same arguments and result shape. Why: on CPUs without native bf16 GEMMs, SDPA with one query row is
    mostly overhead, and with a padding mask it takes its slowest path (one core, 16 sequences x 192 keys,
    16 heads over 4 KV heads: 5.9 ms bf16 SDPA, 0.7 ms here; one sequence: 0.33 ms vs 0.09 ms). Not
    bit-identical to SDPA (another summation order; within a bf16 ulp of the output).
    """
    return _attention(q, k, v, meta, kv_cache, _Attend(sliding_window, _attend_one_fp32, _attend_decode_fp32))


@dataclass(frozen=True)
class _Attend:
    """How `_attention` attends: the window, one sequence's rows, and a batch of one-token decodes."""

    sliding_window: int | None
    one: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int | None], torch.Tensor]
    decode: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, DecodeBatch, int | None], torch.Tensor]


def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    kv_cache: KVCache | None,
    how: _Attend,
) -> torch.Tensor:
    sliding_window = how.sliding_window
    if kv_cache is not None:
        k_cache, v_cache = kv_cache
        block_size = k_cache.shape[1]
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    qsl = meta.query_start_loc
    batched = decode_batch(meta, block_size) if kv_cache is not None else None
    if batched is not None:
        out[batched.rows] = how.decode(q[batched.rows], k_cache, v_cache, batched, sliding_window)
    skip = set(batched.seqs) if batched is not None else ()
    for b, ctx in enumerate(meta.context_lens):
        start, end = qsl[b], qsl[b + 1]
        if end == start or b in skip:
            continue
        if kv_cache is None or ctx == end - start:  # no cache, or a first prompt chunk: nothing cached yet
            kb, vb = k[start:end], v[start:end]  # [C, KVH, Dh], C = q_len
        else:
            n_blocks = (ctx + block_size - 1) // block_size
            blocks = meta.block_tables[b, :n_blocks]
            kb = k_cache[blocks].flatten(0, 1)[:ctx]  # [C, KVH, Dh]
            vb = v_cache[blocks].flatten(0, 1)[:ctx]
        out[start:end] = how.one(q[start:end], kb, vb, sliding_window)
    return out


def _attend_one(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sliding_window: int | None
) -> torch.Tensor:
    """One sequence: q [Q, H, Dh] are the last Q of the C positions of k, v [C, KVH, Dh].

    SDPA gets 4-D inputs with a batch of one and native GQA: on CPU the 3-D form takes another kernel whose
    bf16 rounding differs from the reference implementation's.
    """
    Q, C = q.shape[0], k.shape[0]
    qh = q.transpose(0, 1)[None]  # [1, H, Q, Dh]
    kh = k.transpose(0, 1)[None]  # [1, KVH, C, Dh]
    vh = v.transpose(0, 1)[None]  # [1, KVH, C, Dh]
    if sliding_window is None and Q == C:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)
    elif sliding_window is None and Q == 1:
        o = F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=True)
    else:
        q_pos = torch.arange(C - Q, C, device=q.device)[:, None]  # [Q, 1]
        k_pos = torch.arange(C, device=q.device)[None, :]  # [1, C]
        mask = k_pos <= q_pos  # [Q, C]
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=True)
    return o[0].transpose(0, 1)  # [Q, H, Dh]


def _attend_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: DecodeBatch,
    sliding_window: int | None,
) -> torch.Tensor:
    """One new token for each of Bd sequences: q [Bd, H, Dh] against their paged contexts -> [Bd, H, Dh].

    Contexts are gathered page by page into [Bd, C] (C = the longest, rounded up to whole blocks) and the
    padding is masked, so one SDPA call serves the whole batch instead of one call per sequence.
    """
    Bd, W = batch.tables.shape
    kb = k_cache[batch.tables].flatten(1, 2)  # [Bd, C, KVH, Dh]
    vb = v_cache[batch.tables].flatten(1, 2)  # [Bd, C, KVH, Dh]
    mask = batch.valid  # [Bd, 1, 1, C]
    if sliding_window is not None:
        key_pos = torch.arange(kb.shape[1], device=q.device)  # [C]
        mask = mask & (key_pos[None, :] >= batch.context_lens[:, None] - sliding_window)[:, None, None, :]
    o = F.scaled_dot_product_attention(
        q[:, :, None, :],  # [Bd, H, 1, Dh]
        kb.transpose(1, 2),  # [Bd, KVH, C, Dh]
        vb.transpose(1, 2),
        attn_mask=mask,
        enable_gqa=True,
    )  # [Bd, H, 1, Dh]
    return o[:, :, 0, :]


def _attend_one_fp32(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sliding_window: int | None
) -> torch.Tensor:
    """`_attend_one` with one query row in fp32 matmuls: q [1, H, Dh]; k, v [C, KVH, Dh] -> [1, H, Dh].

    Several query rows (prefill) stay on SDPA.
    """
    if q.shape[0] != 1:
        return _attend_one(q, k, v, sliding_window)
    if sliding_window is not None:
        k, v = k[-sliding_window:], v[-sliding_window:]  # the query is the last position
    H, Dh = q.shape[1:]
    KVH = k.shape[1]
    qg = q.float().view(KVH, H // KVH, Dh)  # [KVH, G, Dh]: query head h reads KV head h // G
    scores = torch.matmul(qg, k.float().permute(1, 2, 0)).mul_(Dh**-0.5)  # [KVH, G, C]
    o = torch.matmul(torch.softmax(scores, dim=-1), v.float().transpose(0, 1))  # [KVH, G, Dh]
    return o.view(1, H, Dh).to(q.dtype)


def _attend_decode_fp32(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: DecodeBatch,
    sliding_window: int | None,
) -> torch.Tensor:
    """`_attend_decode` in fp32 matmuls: q [Bd, H, Dh] against the paged contexts -> [Bd, H, Dh]."""
    Bd, H, Dh = q.shape
    kb = k_cache[batch.tables].flatten(1, 2).float()  # [Bd, C, KVH, Dh]
    vb = v_cache[batch.tables].flatten(1, 2).float()
    KVH, C = kb.shape[2], kb.shape[1]
    valid = batch.valid[:, :, 0, :]  # [Bd, 1, C]
    if sliding_window is not None:
        key_pos = torch.arange(C, device=q.device)  # [C]
        valid = valid & (key_pos[None, :] >= batch.context_lens[:, None] - sliding_window)[:, None, :]
    qg = q.float().view(Bd, KVH, H // KVH, Dh)  # [Bd, KVH, G, Dh]
    scores = torch.matmul(qg, kb.permute(0, 2, 3, 1)).mul_(Dh**-0.5)  # [Bd, KVH, G, C]
    scores.masked_fill_(~valid[:, :, None, :], float("-inf"))
    o = torch.matmul(torch.softmax(scores, dim=-1), vb.transpose(1, 2))  # [Bd, KVH, G, Dh]
    return o.view(Bd, H, Dh).to(q.dtype)
