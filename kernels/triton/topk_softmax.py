"""Top-k softmax routing: softmax over experts, keep the k largest, and renormalize them to sum to 1
(Mixtral, Qwen3-MoE with `norm_topk_prob`) or keep their probabilities over all E (Qwen2-MoE, OLMoE).

Renormalized top-k of a softmax equals a softmax over the k largest logits alone, so the kernel never
forms the full distribution: it picks the k largest logits by repeated argmax and normalizes those; without
renormalizing the normalizer is the sum over the whole row instead.
Reference: `reference.route_reference(logits, top_k, renormalize)`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_runtime.kernels.reference import RoutingResult


@triton.jit
def _topk_softmax_kernel(
    # Pointers
    logits_ptr,  # [T, E] any float dtype
    weights_ptr,  # [T, K] fp32
    ids_ptr,  # [T, K] int32
    # Dimensions
    T,
    E,
    # Strides
    stride_lt,
    stride_le,
    # Meta-parameters
    K: tl.constexpr,
    RENORMALIZE: tl.constexpr,  # normalize over the K picks (True) or over all E experts (False)
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,  # next power of two >= E
):
    # -----------------------------------------------------------
    # Each program routes BLOCK_T tokens; a row of E logits fits in registers.
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    t_mask = offs_t < T
    ptrs = logits_ptr + offs_t[:, None].to(tl.int64) * stride_lt + offs_e[None, :] * stride_le
    x = tl.load(ptrs, mask=t_mask[:, None] & (offs_e[None, :] < E), other=0.0).to(tl.float32)
    x = tl.where(offs_e[None, :] < E, x, float("-inf"))  # padded experts never win; rows past T stay finite

    # -----------------------------------------------------------
    # Pass 1: the normalizer, the sum of exp over the K largest logits, or over the whole row (shifted by
    # the row max, so exp never overflows; padded experts add exp(-inf) = 0). Argmax breaks ties towards the
    # lower expert id, as torch.topk does on CPU.
    row_max = tl.max(x, axis=1)  # [BLOCK_T]
    if RENORMALIZE:
        denom = tl.zeros((BLOCK_T,), dtype=tl.float32)
        rest = x
        for _ in tl.static_range(K):
            best = tl.argmax(rest, axis=1)  # [BLOCK_T]
            denom += tl.exp(tl.max(rest, axis=1) - row_max)
            rest = tl.where(offs_e[None, :] == best[:, None], float("-inf"), rest)
    else:
        denom = tl.sum(tl.exp(x - row_max[:, None]), axis=1)  # [BLOCK_T]

    # -----------------------------------------------------------
    # Pass 2: the same picks again, now written out normalized (recomputing E <= 256 compares is cheaper
    # than a store/load round trip, which would need a barrier between threads).
    for j in tl.static_range(K):
        best = tl.argmax(x, axis=1)
        weight = tl.exp(tl.max(x, axis=1) - row_max) / denom
        tl.store(ids_ptr + offs_t * K + j, best.to(tl.int32), mask=t_mask)
        tl.store(weights_ptr + offs_t * K + j, weight, mask=t_mask)
        x = tl.where(offs_e[None, :] == best[:, None], float("-inf"), x)


def topk_softmax(router_logits: torch.Tensor, top_k: int, renormalize: bool = True) -> RoutingResult:
    """`route_reference` on the GPU. router_logits: [T, E] float; returns weights [T, k] fp32, ids [T, k]
    int32, ids by descending weight.

    Example: logits [[0, 2, 1, -1]] with top_k=2 give ids [[1, 2]] and weights [[0.7311, 0.2689]]
    renormalized, [[0.6439, 0.2369]] (their softmax probabilities over all four) otherwise.
    """
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E], got shape {tuple(router_logits.shape)}")
    T, E = router_logits.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k={top_k} must be in [1, E={E}]")
    weights = torch.empty(T, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=router_logits.device)
    if T == 0:
        return RoutingResult(weights=weights, ids=ids)
    block_t = 16
    _topk_softmax_kernel[(triton.cdiv(T, block_t),)](
        router_logits, weights, ids,
        T, E,
        router_logits.stride(0), router_logits.stride(1),
        K=top_k, RENORMALIZE=renormalize, BLOCK_T=block_t, BLOCK_E=triton.next_power_of_2(E),
    )  # fmt: skip
    return RoutingResult(weights=weights, ids=ids)
