"""Torch references for every kernel: the test oracle and the portable fallback.

Each function has the same signature as the kernel it checks. The MoE arithmetic deliberately follows
transformers' `MixtralSparseMoeBlock` with its default experts implementation step by step, so that in bf16
the reference gives the same bits as the reference implementation of the model, not merely close ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RoutingResult:
    """Which experts each token goes to, and with what weight.

    weights: [T, k] float32, each row sums to 1 when renormalized.
    ids:     [T, k] int32 expert ids in [0, E), ordered by descending weight.
    """

    weights: torch.Tensor
    ids: torch.Tensor

    @property
    def top_k(self) -> int:
        return self.ids.shape[1]


def route_reference(router_logits: torch.Tensor, top_k: int, renormalize: bool = True) -> RoutingResult:
    """Softmax over experts (fp32), top-k, then renormalize the k weights to sum to 1, as Mixtral does.

    router_logits: [T, E] any float dtype.

    Example:
        >>> r = route_reference(torch.tensor([[0.0, 2.0, 1.0, -1.0]]), top_k=2)
        >>> r.ids.tolist(), [round(w, 4) for w in r.weights[0].tolist()]
        ([[1, 2]], [0.7311, 0.2689])
    """
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return RoutingResult(weights=weights, ids=ids.to(torch.int32))


def fused_moe_reference(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    routing: RoutingResult,
    slot_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[t] = sum_k weights[t, k] * w2[s] @ (silu(w1[s] @ x[t]) * (w3[s] @ x[t])), s = slot of ids[t, k].

    hidden:   [T, H]
    w13:      [S, 2I, H]  gate rows (checkpoint w1) then up rows (w3), one entry per resident slot
    w2:       [S, H, I]
    routing:  RoutingResult with ids [T, k] in [0, E)
    slot_map: [E] int, expert id -> slot in [0, S), or -1 for "not resident here" (contributes zero).
              None means S == E and slot == expert id.
    Returns [T, H] in hidden's dtype.

    Each (token, k) pair's expert MLP runs in hidden's dtype; its output times the fp32 routing weight is
    kept in fp32 and the k pairs of a token are summed in fp32 in k order, with one rounding at the end.
    That is what transformers' default (`grouped_mm`) experts do, so bf16 outputs match it bit for bit.
    """
    T, H = hidden.shape
    S = w13.shape[0]
    ids = routing.ids.long()  # [T, k]
    slots = ids if slot_map is None else slot_map.to(ids.device).long()[ids]  # [T, k], -1 = not here
    pairs = torch.zeros(T, ids.shape[1], H, dtype=torch.float32, device=hidden.device)  # [T, k, H]
    for s in torch.unique(slots[slots >= 0]).tolist():
        assert s < S, f"slot {s} out of range for {S} resident slots"
        token_idx, kpos = torch.where(slots == s)  # each token at most once per slot
        gate, up = F.linear(hidden[token_idx], w13[s]).chunk(2, dim=-1)  # [n, I] each
        y = F.linear(F.silu(gate) * up, w2[s])  # [n, H]
        pairs[token_idx, kpos] = y * routing.weights[token_idx, kpos, None]  # fp32 weights promote
    return pairs.sum(dim=1).to(hidden.dtype)  # [T, H]
