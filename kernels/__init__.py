"""MoE kernels: top-k routing and the fused expert MLP over tokens grouped by expert.

The public API (the model and the expert store use only this):
    route(router_logits[T, E], top_k, renormalize=True) -> RoutingResult
    fused_moe(hidden[T, H], w13[S, 2I, H], w2[S, H, I], routing, *, slot_map=None, backend="auto")
"""

from __future__ import annotations

import torch

from moe_runtime.kernels.reference import RoutingResult, fused_moe_reference, route_reference

__all__ = ["RoutingResult", "route", "fused_moe"]


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool = True) -> RoutingResult:
    """Softmax, top-k and renormalize. router_logits: [T, E]; returns weights [T, k] fp32, ids [T, k] int32."""
    return route_reference(router_logits, top_k, renormalize)


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    routing: RoutingResult,
    *,
    slot_map: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """See `reference.fused_moe_reference` for the contract. Returns [T, H] in hidden's dtype."""
    return fused_moe_reference(hidden, w13, w2, routing, slot_map)
