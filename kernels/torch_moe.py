"""The torch backend: the fastest MoE we have found on CPU with plain torch ops.

1. Sort the (token, k) pairs by slot once (one argsort, one bincount) and gather the routed rows, so each
   active expert sees one contiguous slice: no per-expert `where` scans and no index_add chains.
2. Per active expert: one GEMM against the fused w13 (gate and up in one pass over x), SwiGLU in place,
   one GEMM against w2, routing weight applied in fp32 as the reference does.
3. Scatter the fp32 rows back to (token, k) order, sum over k in fp32 and round once (the reference's
   combine, and the Triton backend's).

Why a loop over active experts and not `torch.nn.functional.grouped_mm`: on CPU (torch 2.13) grouped_mm
runs the same per-group GEMMs (measured equal within noise, bench/kernels.py), and the loop lets each
expert choose its compute dtype. That choice matters on CPUs without native bf16 GEMMs (AVX2, no
AVX512-BF16/AMX): a bf16 GEMM there takes about 3-5x as long per row as fp32, so once an expert has
`UPCAST_MIN_ROWS` rows it is cheaper to convert its weights to fp32 on the fly (~2x the weight bytes,
read once) and run the fp32 GEMM. Decode-sized groups stay in the weights' dtype, where a GEMV streams
the weights once. Numbers: docs/benchmarks.md ("Kernels").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from moe_runtime.kernels.reference import RoutingResult

# Rows per expert from which a 16-bit expert runs in fp32 on CPU. Measured on a 2-core AVX2 EPYC: bf16
# [n, 1024] x [1024, 7168] costs ~1.5 ms per row, the fp32 one ~0.5 ms per row plus ~6 ms to convert
# the weights; the crossover moved between 8 and 32 rows with the load from other processes.
UPCAST_MIN_ROWS = 16


def _compute_dtype(rows: torch.Tensor) -> torch.dtype:
    """fp32 for large 16-bit groups on CPU (see module docstring); otherwise the input dtype."""
    if rows.device.type == "cpu" and rows.dtype != torch.float32 and rows.shape[0] >= UPCAST_MIN_ROWS:
        return torch.float32
    return rows.dtype


def _expert_mlp(rows: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """w2 @ (silu(w1 @ x) * (w3 @ x)) for one expert. rows: [n, H]; w13: [2I, H]; w2: [H, I] -> [n, H]."""
    dtype = _compute_dtype(rows)
    inter_size = w2.shape[1]
    h13 = F.linear(rows.to(dtype), w13.to(dtype))  # [n, 2I]
    gate, up = h13[:, :inter_size], h13[:, inter_size:]  # [n, I] each
    h = F.silu(gate, inplace=True).mul_(up)  # [n, I], in place over the gate half
    return F.linear(h, w2.to(dtype))  # [n, H]


def fused_moe_torch(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    routing: RoutingResult,
    slot_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `reference.fused_moe_reference`.

    hidden: [T, H]; w13: [S, 2I, H]; w2: [S, H, I]; routing ids/weights [T, k]; slot_map: [E] int or None
    (-1 = not resident: contributes zero). Returns [T, H] in hidden's dtype. Bit-identical to the
    reference (same ops in the same order) except for 16-bit groups of >= UPCAST_MIN_ROWS rows on CPU,
    which are computed in fp32: more accurate than the reference, and within a few output ulps of it.
    """
    T, H = hidden.shape
    S, k = w13.shape[0], routing.top_k
    slots = routing.ids if slot_map is None else slot_map.to(routing.ids.device)[routing.ids.long()]  # [T, k]
    flat = slots.reshape(-1).long()  # [T*k]
    order = torch.argsort(flat, stable=True)  # [T*k], dropped pairs (-1) first
    counts = torch.bincount(flat + 1, minlength=S + 1).tolist()  # [S+1], counts[0] = dropped
    weights = routing.weights.reshape(-1)[order]  # [T*k] fp32, sorted like the rows
    rows = hidden[order // k]  # [T*k, H] sorted by slot
    sorted_out = torch.empty(T * k, H, dtype=torch.float32, device=hidden.device)  # [T*k, H]
    sorted_out[: counts[0]] = 0
    start = counts[0]
    for s, n in enumerate(counts[1:]):
        if n == 0:
            continue
        end = start + n
        y = _expert_mlp(rows[start:end], w13[s], w2[s])  # [n, H]
        torch.mul(y, weights[start:end, None], out=sorted_out[start:end])  # fp32, as the reference keeps it
        start = end
    pairs = torch.empty_like(sorted_out)
    pairs[order] = sorted_out  # back to (token, k) order
    return pairs.view(T, k, H).sum(dim=1).to(hidden.dtype)  # [T, H], one rounding
