"""MoE kernels: top-k routing and the fused expert MLP over tokens grouped by expert.

The public API (the model and the expert store use only this):
    route(router_logits[T, E], top_k, renormalize=True) -> RoutingResult
    fused_moe(hidden[T, H], w13[S, 2I, H], w2[S, H, I], routing, *, slot_map=None, backend="auto")
    fused_moe_fp32(...same...) -> [T, H] fp32: fused_moe before its final rounding (expert-parallel shares)

Backends (`backends.BACKENDS`): "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch" (fastest CPU
path), "reference" (transformers' eager arithmetic, bit for bit), "megablocks" (not wired yet);
"auto" = triton on CUDA, torch elsewhere.
"""

from __future__ import annotations

import torch

from moe_runtime.kernels.backends import FP32_BACKENDS, resolve_backend
from moe_runtime.kernels.reference import RoutingResult, route_reference

__all__ = ["RoutingResult", "route", "fused_moe", "fused_moe_fp32"]


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool = True) -> RoutingResult:
    """Softmax, top-k and renormalize. router_logits: [T, E]; returns weights [T, k] fp32, ids [T, k] int32.

    On CUDA, Mixtral's renormalized routing runs as one Triton kernel; everything else uses the reference.
    """
    if router_logits.is_cuda and renormalize:
        from moe_runtime.kernels.triton.topk_softmax import topk_softmax  # lazy, see backends.py

        return topk_softmax(router_logits, top_k)
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
    return resolve_backend(backend, hidden.device)(hidden, w13, w2, routing, slot_map)


def fused_moe_fp32(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    routing: RoutingResult,
    *,
    slot_map: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """`fused_moe` without its final rounding: [T, H] float32, each token's k weighted pairs summed in fp32.

    `fused_moe(...) == fused_moe_fp32(...).to(hidden.dtype)` bit for bit. Expert-parallel ranks each run
    this on the pairs they own and sum the fp32 shares before rounding once (see `reference` for why that
    is exact for top-2 routing).
    """
    return resolve_backend(backend, hidden.device, FP32_BACKENDS)(hidden, w13, w2, routing, slot_map)
