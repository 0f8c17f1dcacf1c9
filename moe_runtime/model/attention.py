"""Attention over a flat batch of sequences, with an optional paged KV cache.

A step's tokens are flat: sequence b owns rows `query_start_loc[b]:query_start_loc[b+1]` of q/k/v and has
`context_lens[b]` tokens in its context after this step (cached + new), so its new tokens sit at positions
`context_lens[b] - q_len .. context_lens[b] - 1`. Without a cache every sequence is a whole prompt.

The KV cache of one layer is a pair of tensors [num_blocks, block_size, KVH, Dh]; token j of sequence b
lives in slot `block_tables[b][j // block_size] * block_size + j % block_size`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# B sequences, T flat tokens, H query heads, KVH key/value heads, Dh head dim, C context tokens


@dataclass(frozen=True)
class AttentionMetadata:
    """What attention needs to know about a step's flat batch. Built by the engine's model runner."""

    # [B+1] host ints: cumulative new-token counts; sequence b's new tokens are rows qsl[b]:qsl[b+1].
    query_start_loc: list[int]
    # [B] host ints: tokens in sequence b's context after this step (cached + new).
    context_lens: list[int]
    # [T] int64: flat KV slot for each new token; None when running without a cache.
    slot_mapping: torch.Tensor | None = None
    # [B, max_blocks] int64: KV block ids of each sequence, padded; None without a cache.
    block_tables: torch.Tensor | None = None

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


KVCache = tuple[torch.Tensor, torch.Tensor]  # (k, v), each [num_blocks, block_size, KVH, Dh]


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
    `meta.slot_mapping` first when a cache is given. Returns [T, H, Dh].
    """
    if kv_cache is not None:
        k_cache, v_cache = kv_cache
        block_size = k_cache.shape[1]
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    qsl = meta.query_start_loc
    for b, ctx in enumerate(meta.context_lens):
        start, end = qsl[b], qsl[b + 1]
        if end == start:
            continue
        if kv_cache is None:
            kb, vb = k[start:end], v[start:end]  # [C, KVH, Dh], C = q_len
        else:
            n_blocks = (ctx + block_size - 1) // block_size
            blocks = meta.block_tables[b, :n_blocks]
            kb = k_cache[blocks].flatten(0, 1)[:ctx]  # [C, KVH, Dh]
            vb = v_cache[blocks].flatten(0, 1)[:ctx]
        out[start:end] = _attend_one(q[start:end], kb, vb, sliding_window)
    return out


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
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
