"""MoE kernels: top-k routing and the fused expert MLP over tokens grouped by expert.

The public API (the model, the expert store and the runtime's config use only this):
    route(router_logits[T, E], top_k, renormalize=True) -> RoutingResult (softmax scoring)
    fused_moe_fp32(hidden[T, H], w13[S, 2I, H], w2[S, H, I], routing, *, slot_map=None, backend="auto")
        -> [T, H] fp32: each token's k weighted pairs summed in fp32, not rounded (expert-parallel shares)
    fused_moe(...same...) -> [T, H] in hidden's dtype: fused_moe_fp32 rounded once
    BACKEND_NAMES: the names `backend` may take ("auto" first)
w13 and w2 are 16/32-bit stacks or, for quantized experts, `quant.QuantizedWeight`s (int8 / fp8 values
with an fp32 scale per row); every backend takes both ("reference" and "torch" dequantize per expert, "cpu"
runs int8 natively, "triton" reads int8 and fp8 tiles in its grouped GEMMs: w8a16, and w8a8 for fp8 experts
on GPUs of compute capability >= 8.9, `triton.fused_moe.fused_moe_for`).

Backends (`backends.BACKENDS`, each one function with `fused_moe_fp32`'s contract): "triton" (CUDA, or CPU
under TRITON_INTERPRET=1), "torch" (fastest exact CPU path), "cpu" (torch with native expert GEMMs for small
groups), "reference" (transformers' eager arithmetic, bit for bit), "megablocks" (not wired yet: raises
BackendUnavailableError); "auto" = triton on CUDA, torch elsewhere. An unknown name raises
UnknownBackendError.
"""

from __future__ import annotations

import torch

from moe_runtime.kernels.backends import (
    BACKEND_NAMES,
    UNAVAILABLE_BACKENDS,
    BackendUnavailableError,
    UnknownBackendError,
    moe_kernel,
    resolve_backend,
)
from moe_runtime.kernels.reference import RoutingResult, route_reference

__all__ = [
    "RoutingResult",
    "route",
    "fused_moe",
    "fused_moe_fp32",
    "BACKEND_NAMES",
    "UNAVAILABLE_BACKENDS",
    "BackendUnavailableError",
    "UnknownBackendError",
    "moe_kernel",
]


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool = True) -> RoutingResult:
    """Softmax scoring over the E experts, top-k, and optionally renormalize the k weights to sum to 1.

    router_logits: [T, E]; returns weights [T, k] fp32, ids [T, k] int32. The variants: Mixtral and
    Qwen3-MoE with `norm_topk_prob` renormalize; Qwen2-MoE and OLMoE keep the softmax probabilities of the
    whole row (`renormalize=False`). Shared experts are not routed (the model adds them outside). On CUDA
    both variants run as one Triton kernel; elsewhere the reference.
    """
    if router_logits.is_cuda:
        from moe_runtime.kernels.triton.topk_softmax import topk_softmax  # lazy, see backends.py

        return topk_softmax(router_logits, top_k, renormalize)
    return route_reference(router_logits, top_k, renormalize)


def fused_moe_fp32(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    routing: RoutingResult,
    *,
    slot_map: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The experts' SwiGLU MLPs over the routed pairs, before the final rounding.

    hidden [T, H]; w13 [S, 2I, H]; w2 [S, H, I]; routing ids/weights [T, k]; slot_map [E] int or None
    (-1 = not resident here: contributes zero). Returns [T, H] float32, each token's k weighted pairs summed
    in fp32 (see `reference.fused_moe_reference_fp32` for the contract). Expert-parallel ranks each run this
    on the pairs they own and sum the fp32 shares before rounding once (exact for top-2 routing).
    """
    return resolve_backend(backend, hidden.device)(hidden, w13, w2, routing, slot_map)


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    routing: RoutingResult,
    *,
    slot_map: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """`fused_moe_fp32` rounded once: same arguments, returns [T, H] in hidden's dtype."""
    fp32 = fused_moe_fp32(hidden, w13, w2, routing, slot_map=slot_map, backend=backend)  # [T, H]
    return fp32.to(hidden.dtype)  # one rounding
