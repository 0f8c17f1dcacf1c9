"""Expert outputs per (token, k) pair, for steps whose experts are not all resident at once.

`fused_moe` rounds its output to the activation dtype after summing a token's k pairs in fp32. A step
that runs its experts in parts (several waves of slots, or some experts on the host) cannot add rounded
part outputs and stay bit-identical in bf16, so it fills one fp32 `pairs [T, A, D]` buffer expert by
expert, exactly as `kernels.reference.fused_moe_reference` does, and rounds once at the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_runtime.kernels import RoutingResult

# T tokens, A activated (top-k), D hidden, I intermediate, n tokens routed to one expert


def new_pairs(x: torch.Tensor, top_k: int) -> torch.Tensor:
    """An fp32 [T, A, D] buffer of zeros (a pair whose expert never runs contributes zero)."""
    return torch.zeros(x.shape[0], top_k, x.shape[1], dtype=torch.float32, device=x.device)


def add_expert(pairs: torch.Tensor, x: torch.Tensor, routing: RoutingResult, expert: int,
               w13: torch.Tensor, w2: torch.Tensor) -> None:
    """Write expert `expert`'s weighted output into its (token, k) pairs.

    x: [T, D] on the weights' device; w13: [2I, D], w2: [D, I]; routing on x's device. pairs: [T, A, D]
    fp32, on any device (the result is moved there).
    """
    token_idx, kpos = torch.where(routing.ids == expert)  # [n] each: row-major, as the reference
    gate, up = F.linear(x[token_idx], w13).chunk(2, dim=-1)  # [n, I] each
    y = F.linear(F.silu(gate) * up, w2)  # [n, D]
    y = y * routing.weights[token_idx, kpos, None]  # fp32 [n, D]
    pairs[token_idx.to(pairs.device), kpos.to(pairs.device)] = y.to(pairs.device)


def finish(pairs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sum each token's A pairs in k order and round once: [T, A, D] fp32 -> [T, D] in `dtype`."""
    return pairs.sum(dim=1).to(dtype)
