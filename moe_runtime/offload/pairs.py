"""Expert outputs per (token, k) pair, for steps whose experts are not all resident at once.

`fused_moe` rounds its output to the activation dtype after summing a token's k pairs in fp32. A step
that runs its experts in parts (several waves of slots, or some experts on the host) cannot add rounded
part outputs and stay bit-identical in bf16, so it fills one fp32 `pairs [T, A, D]` buffer expert by
expert and rounds once at the end, as the backends do. Each expert's MLP uses the arithmetic of the
backend the all-resident step would use (`expert_mlp_for`): the torch backend runs 16-bit experts with
many rows in fp32, the reference never does, and the results differ in the last bits. (The Triton backend
has no per-expert entry point: on CUDA, parts use the reference arithmetic, equal within rounding.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from moe_runtime.kernels import RoutingResult
from moe_runtime.kernels.backends import resolve_backend

# TODO(offload): ask kernels for a public per-expert entry point; this is the torch backend's own.
from moe_runtime.kernels.torch_moe import _expert_mlp as _torch_expert_mlp
from moe_runtime.kernels.torch_moe import fused_moe_torch

ExpertMlp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# T tokens, A activated (top-k), D hidden, I intermediate, n tokens routed to one expert


def new_pairs(x: torch.Tensor, top_k: int) -> torch.Tensor:
    """An fp32 [T, A, D] buffer of zeros (a pair whose expert never runs contributes zero)."""
    return torch.zeros(x.shape[0], top_k, x.shape[1], dtype=torch.float32, device=x.device)


def reference_mlp(rows: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """w2 @ (silu(w1 @ x) * (w3 @ x)) in rows' dtype, as `fused_moe_reference`. rows [n, D] -> [n, D]."""
    gate, up = F.linear(rows, w13).chunk(2, dim=-1)  # [n, I] each
    return F.linear(F.silu(gate) * up, w2)


def expert_mlp_for(backend: str, device: torch.device) -> ExpertMlp:
    """The per-expert MLP whose arithmetic equals `backend`'s on `device`."""
    return _torch_expert_mlp if resolve_backend(backend, device) is fused_moe_torch else reference_mlp


def add_expert(pairs: torch.Tensor, x: torch.Tensor, routing: RoutingResult, expert: int,
               w13: torch.Tensor, w2: torch.Tensor, mlp: ExpertMlp = reference_mlp) -> None:
    """Write expert `expert`'s weighted output into its (token, k) pairs.

    x: [T, D] on the weights' device; w13: [2I, D], w2: [D, I]; routing on x's device. pairs: [T, A, D]
    fp32, on any device (the result is moved there). Rows are taken in (token, k) order, as the backends
    sort them, so every GEMM sees the same rows in the same order as in the all-resident step.
    """
    token_idx, kpos = torch.where(routing.ids == expert)  # [n] each: row-major
    y = mlp(x[token_idx], w13, w2)  # [n, D] in x's dtype (or fp32 when the backend upcasts)
    y = y * routing.weights[token_idx, kpos, None]  # fp32 [n, D]
    pairs[token_idx.to(pairs.device), kpos.to(pairs.device)] = y.to(pairs.device)


def finish(pairs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sum each token's A pairs in k order and round once: [T, A, D] fp32 -> [T, D] in `dtype`."""
    return pairs.sum(dim=1).to(dtype)
