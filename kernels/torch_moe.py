"""The torch backend: the fastest MoE we have found on CPU with plain torch ops.

1. Sort the (token, k) pairs by slot once (one argsort, one bincount) and gather the routed rows, so each
   active expert sees one contiguous slice: no per-expert `where` scans and no index_add chains.
2. Per active expert: one GEMM against the fused w13 (gate and up in one pass over x), SwiGLU in place,
   one GEMM against w2, routing weight applied in fp32 as the reference does.
3. Scatter the fp32 rows back to (token, k) order and sum over k in fp32 (the reference's combine, and
   the Triton backend's); `kernels.fused_moe` rounds that sum once.

Why a loop over active experts and not `torch.nn.functional.grouped_mm`: on CPU (torch 2.13) grouped_mm
runs the same per-group GEMMs (measured equal within noise), and the loop lets each expert choose how to
multiply. That choice matters on CPUs without native bf16 GEMMs (AVX2, no AVX512-BF16/AMX): there a bf16
GEMM converts the weights again for every row, so n rows cost n GEMVs (~1.5 ms per row for a 7168 x 1024
matrix on one core). Once an expert has `UPCAST_MIN_ROWS` rows, converting its weights to fp32 once, a
cache-sized chunk at a time, and running fp32 GEMMs on the chunks is cheaper (one core: 1.3x at 4 rows,
2x at 8, 3.6x at 16, 6x at 64). One-row groups (decode) stay a bf16 GEMV, which reads the weights once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from moe_runtime.kernels.quant import QuantizedWeight
from moe_runtime.kernels.reference import RoutingResult

ExpertMlp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Rows per expert from which a 16-bit expert runs in fp32 on CPU. Measured on one core of a shared 2-core
# AVX2 EPYC (process CPU time, [n, 1024] x [1024, 7168]): bf16 1.5 / 2.9 / 5.8 / 11.5 / 22.6 ms for n = 1 /
# 2 / 4 / 8 / 16; chunked fp32 2.3 / 3.0 / 4.6 / 5.4 / 6.3 ms. Speed alone says 4 (the whole MoE at
# M = 16 / 32 / 64 then runs 1.25x / 2x / 3.1x the naive loop). It stays 16 because below it the 16-bit
# path is the reference's arithmetic bit for bit, which the bf16 parity tests with transformers (greedy
# tokens of tiny random models, prompts < 16 tokens) rely on through `auto`; see docs/benchmarks.md.
UPCAST_MIN_ROWS = 16
# Weight elements converted per chunk: 4 MB in fp32, so the chunk is still in cache when the GEMM reads it.
UPCAST_CHUNK = 1 << 20


def _upcast_linear(x: torch.Tensor, w: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    """x @ w.T in fp32 without an fp32 copy of all of w. x: [n, K] fp32; w: [N, K] 16-bit, or 8-bit with
    per-row scales (each chunk dequantized: values times scales, in fp32) -> [n, N] fp32."""
    N, K = w.shape
    out = torch.empty(x.shape[0], N, dtype=torch.float32, device=x.device)
    step = max(1, UPCAST_CHUNK // K)
    buf = torch.empty(min(step, N), K, dtype=torch.float32, device=w.device)  # reused for every chunk
    for start in range(0, N, step):
        end = min(start + step, N)
        chunk = buf[: end - start]
        if isinstance(w, QuantizedWeight):  # the values made fp32 (exact), then times the row scales
            chunk.copy_(w.data[start:end]).mul_(w.scale[start:end, None])
        else:
            chunk.copy_(w[start:end])
        torch.mm(x, chunk.T, out=out[:, start:end])
    return out


def _expert_mlp(rows: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """w2 @ (silu(w1 @ x) * (w3 @ x)) for one expert. rows: [n, H]; w13: [2I, H]; w2: [H, I] -> [n, H].

    In rows' dtype, except 16-bit groups of >= UPCAST_MIN_ROWS rows on CPU: fp32 (see module docstring).
    """
    upcast = rows.device.type == "cpu" and rows.dtype != torch.float32 and rows.shape[0] >= UPCAST_MIN_ROWS
    return expert_mlp_fp32(rows, w13, w2) if upcast else expert_mlp_16bit(rows, w13, w2)


def expert_mlp_16bit(rows: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert's SwiGLU MLP in rows' dtype with torch's GEMMs (rows [n, H] -> [n, H])."""
    inter_size = w2.shape[1]
    h13 = F.linear(rows, w13)  # [n, 2I]
    gate, up = h13[:, :inter_size], h13[:, inter_size:]  # [n, I] each
    h = F.silu(gate, inplace=True).mul_(up)  # [n, I], in place over the gate half
    return F.linear(h, w2)  # [n, H]


def expert_mlp_fp32(rows: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert's SwiGLU MLP in fp32 on its 16-bit weights widened chunk by chunk (rows [n, H] -> [n, H]
    float32): no fp32 copy of the expert, and more accurate than the 16-bit GEMMs."""
    inter_size = w2.shape[1]
    h13 = _upcast_linear(rows.float(), w13)  # [n, 2I]
    gate, up = h13[:, :inter_size], h13[:, inter_size:]  # [n, I] each
    h = F.silu(gate, inplace=True).mul_(up)  # [n, I]
    return _upcast_linear(h, w2)  # [n, H]


def fused_moe_torch_fp32(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    routing: RoutingResult,
    slot_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `reference.fused_moe_reference_fp32`.

    hidden: [T, H]; w13: [S, 2I, H]; w2: [S, H, I]; routing ids/weights [T, k]; slot_map: [E] int or None
    (-1 = not resident: contributes zero). Returns [T, H] float32, the k weighted pairs of each token summed
    in fp32, not rounded. Bit-identical to the reference (same ops in the same order) except for 16-bit
    groups of >= UPCAST_MIN_ROWS rows on CPU, which are computed in fp32: more accurate than the reference,
    and within a few output ulps of it once rounded.
    """
    if isinstance(w13, QuantizedWeight):
        return run_experts_fp32(hidden, w13, w2, routing, slot_map, expert_mlp_dequantized)
    return run_experts_fp32(hidden, w13, w2, routing, slot_map, _expert_mlp)


def expert_mlp_dequantized(rows: torch.Tensor, w13: QuantizedWeight, w2: QuantizedWeight) -> torch.Tensor:
    """One expert with 8-bit weights on torch's kernels: dequantized to rows' dtype (the reference's
    weights), then `_expert_mlp`. Reads the 8-bit weights and writes and reads 16-bit ones: slower than
    16-bit weights; the portable path (kernels/cpu and Triton read the 8 bits directly)."""
    return _expert_mlp(rows, w13.dequantize(rows.dtype), w2.dequantize(rows.dtype))


def run_experts_fp32(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    routing: RoutingResult,
    slot_map: torch.Tensor | None,
    expert_mlp: ExpertMlp,
) -> torch.Tensor:
    """Steps 1-3 of the module docstring with `expert_mlp(rows[n, H], w13[2I, H], w2[H, I]) -> [n, H]`
    (any float dtype; the weighting is in fp32) per active expert. Returns [T, H] float32, not rounded.
    """
    T, H = hidden.shape
    S, k = w13.shape[0], routing.top_k
    slots = routing.slots(slot_map)  # [T, k]
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
        y = expert_mlp(rows[start:end], w13[s], w2[s])  # [n, H]
        torch.mul(y, weights[start:end, None], out=sorted_out[start:end])  # fp32, as the reference keeps it
        start = end
    pairs = torch.empty_like(sorted_out)
    pairs[order] = sorted_out  # back to (token, k) order
    return pairs.view(T, k, H).sum(dim=1)  # [T, H] fp32, not rounded yet
