"""Torch references for every kernel: the test oracle and the portable fallback.

Each function has the same signature as the kernel it checks. The MoE arithmetic deliberately follows
transformers' `MixtralSparseMoeBlock` with its default experts implementation step by step, so that in bf16
the MoE reference, rounded once, gives the same bits as the reference implementation of the model, not
merely close ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_runtime.kernels.quant import MIN_ACT_AMAX, QMAX, QuantizedActivations, QuantizedWeight


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

    def slots(self, slot_map: torch.Tensor | None) -> torch.Tensor:
        """[T, k] int: the resident slot of each (token, k) pair through slot_map [E] (-1 = not resident
        here), or the expert ids themselves when slot_map is None."""
        return self.ids if slot_map is None else slot_map.to(self.ids.device)[self.ids.long()]


def route_reference(router_logits: torch.Tensor, top_k: int, renormalize: bool = True) -> RoutingResult:
    """Softmax over experts (fp32), top-k, then (renormalize) scale the k weights to sum to 1, as Mixtral
    does; without renormalizing they stay the row's softmax probabilities (Qwen2-MoE, OLMoE).

    router_logits: [T, E] any float dtype.

    Example:
        >>> r = route_reference(torch.tensor([[0.0, 2.0, 1.0, -1.0]]), top_k=2)
        >>> r.ids.tolist(), [round(w, 4) for w in r.weights[0].tolist()]
        ([[1, 2]], [0.7311, 0.2689])
        >>> r = route_reference(torch.tensor([[0.0, 2.0, 1.0, -1.0]]), top_k=2, renormalize=False)
        >>> r.ids.tolist(), [round(w, 4) for w in r.weights[0].tolist()]
        ([[1, 2]], [0.6439, 0.2369])
    """
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return RoutingResult(weights=weights, ids=ids.to(torch.int32))


def fused_moe_reference_fp32(
    hidden: torch.Tensor,
    w13: torch.Tensor | QuantizedWeight,
    w2: torch.Tensor | QuantizedWeight,
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
    Returns [T, H] float32, not rounded: the contract of every MoE backend (`backends.BACKENDS`).

    Each (token, k) pair's expert MLP runs in hidden's dtype; its output times the fp32 routing weight is
    kept in fp32 and the k pairs of a token are summed in fp32 in k order. Rounded once to hidden's dtype
    (as `kernels.fused_moe` does), that is what transformers' default (`grouped_mm`) experts compute, so
    bf16 outputs match them bit for bit. Expert-parallel ranks each compute the pairs they own (the others
    dropped through `slot_map`), sum these fp32 partials and round once: for top-2 routing that is exactly
    the one-rank result, since each token's sum then has one nonzero addition.

    Quantized experts (`quant.QuantizedWeight`, 8-bit values and per-row scales) are defined as the same
    arithmetic on their dequantized weights (data * scale in fp32, rounded once to hidden's dtype): this is
    what every backend's quantized path is tested against, and what the accuracy gate compares with 16 bits.
    """
    if isinstance(w13, QuantizedWeight):
        w13, w2 = w13.dequantize(hidden.dtype), w2.dequantize(hidden.dtype)
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
    return pairs.sum(dim=1)  # [T, H] fp32


@dataclass(frozen=True)
class AlignedRouting:
    """(token, k) pairs sorted by resident slot, each slot's run padded to a whole number of M-blocks.

    sorted_ids: [num_blocks * block_m] int32 flat pair index t * top_k + j; padding holds T * top_k.
    block_slot: [num_blocks] int32 slot of each M-block; -1 marks an unused block at the tail.
    top_k:      pairs per token (token of a pair = flat index // top_k).
    block_m:    rows per M-block; every GEMM over this layout must use the same BLOCK_M.
    num_blocks is the static upper bound cdiv(T * top_k, block_m) + S, so the grid never depends on data.
    """

    sorted_ids: torch.Tensor
    block_slot: torch.Tensor
    top_k: int
    block_m: int


def max_blocks(num_pairs: int, num_slots: int, block_m: int) -> int:
    """Upper bound on M-blocks: every slot adds at most one partly filled block."""
    return -(-num_pairs // block_m) + num_slots


def align_reference(slot_ids: torch.Tensor, num_slots: int, block_m: int) -> AlignedRouting:
    """Sort (token, k) pairs by slot (stable), pad each slot's run to block_m, one slot per M-block.

    slot_ids: [T, k] int, slot of each pair in [0, num_slots), or -1 for "not resident here" (dropped).

    Example (T=3, k=2, 4 slots, block_m=2; pair 1 is token 0's second choice):
        >>> a = align_reference(torch.tensor([[2, 0], [0, 1], [2, 0]]), num_slots=4, block_m=2)
        >>> a.sorted_ids.tolist()  # slot 0: pairs 1 2 5 (+pad 6), slot 1: 3 (+pad), slot 2: 0 4
        [1, 2, 5, 6, 3, 6, 0, 4, 6, 6, 6, 6, 6, 6]
        >>> a.block_slot.tolist()
        [0, 0, 1, 2, -1, -1, -1]
    """
    T, k = slot_ids.shape
    device = slot_ids.device
    flat = slot_ids.flatten().long()  # [T*k]
    num_blocks = max_blocks(T * k, num_slots, block_m)
    sorted_ids = torch.full((num_blocks * block_m,), T * k, dtype=torch.int32, device=device)
    block_slot = torch.full((num_blocks,), -1, dtype=torch.int32, device=device)

    valid = flat >= 0
    counts = torch.bincount(flat[valid], minlength=num_slots)  # [S]
    blocks = (counts + block_m - 1) // block_m  # [S]
    first_row = (torch.cumsum(blocks, 0) - blocks) * block_m  # [S] first padded row of each slot
    first_pair = torch.cumsum(counts, 0) - counts  # [S] first unpadded position of each slot
    order = torch.argsort(torch.where(valid, flat, num_slots), stable=True)[: int(valid.sum())]  # [n]
    slot = flat[order]  # [n] ascending
    rank = torch.arange(order.numel(), device=device) - first_pair[slot]  # position within the slot's run
    sorted_ids[first_row[slot] + rank] = order.to(torch.int32)
    used = torch.repeat_interleave(torch.arange(num_slots, device=device), blocks)  # [sum(blocks)]
    block_slot[: used.numel()] = used.to(torch.int32)
    return AlignedRouting(sorted_ids=sorted_ids, block_slot=block_slot, top_k=k, block_m=block_m)


def _routed_rows(aligned: AlignedRouting, num_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pair index [n], slot [n]) of every real row of an aligned layout, in sorted order."""
    slots = aligned.block_slot.repeat_interleave(aligned.block_m)  # [P]
    real = aligned.sorted_ids < num_pairs
    return aligned.sorted_ids[real].long(), slots[real].long()


def grouped_gemm1_reference(hidden: torch.Tensor, w13: torch.Tensor, aligned: AlignedRouting) -> torch.Tensor:
    """inter[p] = silu(w1[s] @ x[t]) * (w3[s] @ x[t]) for every routed pair p = t * k + j on slot s.

    hidden: [T, H]; w13: [S, 2I, H] gate rows then up rows. Returns [T * k, I] in hidden's dtype,
    computed in fp32 and rounded once, as the kernel does. Rows of dropped pairs (slot -1) are zero.
    """
    T, k, inter_size = hidden.shape[0], aligned.top_k, w13.shape[1] // 2
    out = torch.zeros(T * k, inter_size, dtype=hidden.dtype, device=hidden.device)
    pair, slot = _routed_rows(aligned, T * k)
    for s in torch.unique(slot).tolist():
        p = pair[slot == s]
        gate, up = F.linear(hidden[p // k].float(), w13[s].float()).chunk(2, dim=-1)  # [n, I] each
        out[p] = (F.silu(gate) * up).to(hidden.dtype)
    return out


def grouped_gemm2_reference(
    inter: torch.Tensor, w2: torch.Tensor, aligned: AlignedRouting, weights: torch.Tensor
) -> torch.Tensor:
    """y[t, j] = weights[t, j] * w2[s] @ inter[t * k + j], the top-k rows that the combine sums.

    inter: [T * k, I]; w2: [S, H, I]; weights: [T, k] fp32. Returns [T, k, H] fp32 (the combine sums
    over k, then rounds once); rows of dropped pairs are zero so that summing over k ignores them.
    """
    T, k = weights.shape
    H = w2.shape[1]
    out = torch.zeros(T * k, H, dtype=torch.float32, device=inter.device)
    pair, slot = _routed_rows(aligned, T * k)
    flat_w = weights.flatten().float()  # [T*k]
    for s in torch.unique(slot).tolist():
        p = pair[slot == s]
        out[p] = F.linear(inter[p].float(), w2[s].float()) * flat_w[p, None]
    return out.view(T, k, H)


def quantize_activations_reference(x: torch.Tensor) -> QuantizedActivations:
    """Per-row (per-token) fp8 quantization: scale = max|x[m, :]| / 448, data = e4m3(x * (448 / max|x[m, :]|)).

    x: [M, K] fp32 / fp16 / bf16. Returns `QuantizedActivations` (data [M, K] float8_e4m3fn, scale [M] fp32,
    orig_dtype x.dtype). The arithmetic, which `kernels.triton.quant_act` repeats bit for bit: x widened to
    fp32, the row max (exact), 448 / max and max / 448 IEEE-rounded, one fp32 multiply, clamp to [-448, 448],
    one rounding to e4m3 (nearest, ties to even). A row of zeros (max under `MIN_ACT_AMAX`) gets data 0 and
    scale max / 448 (0 for zeros), so nothing divides by zero.

    Example (row 0's max 2 -> 448; 0.3 * 224 = 67.2 lies between the e4m3 values 64 and 72):
        >>> q = quantize_activations_reference(torch.tensor([[1.0, -2.0, 0.3], [0.0, 0.0, 0.0]]))
        >>> q.data.float().tolist(), q.scale.tolist()
        ([[224.0, -448.0, 64.0], [0.0, 0.0, 0.0]], [0.004464285913854837, 0.0])
    """
    qmax = QMAX[torch.float8_e4m3fn]
    xf = x.float()
    amax = xf.abs().amax(dim=-1)  # [M]
    # tensor / tensor: torch computes `number / tensor` (and, on CUDA, `tensor / number`) as a reciprocal
    # and a multiply, two roundings instead of one
    fp8_max = torch.full_like(amax, qmax)  # [M]
    inv = torch.where(amax >= MIN_ACT_AMAX, fp8_max / amax.clamp_min(MIN_ACT_AMAX), 0.0)  # [M]
    data = (xf * inv[:, None]).clamp(-qmax, qmax).to(torch.float8_e4m3fn)  # [M, K], rounded once
    return QuantizedActivations(data=data, scale=amax / fp8_max, orig_dtype=x.dtype)


def fused_moe_reference_w8a8_fp32(
    hidden: torch.Tensor,
    w13: QuantizedWeight,
    w2: QuantizedWeight,
    routing: RoutingResult,
    slot_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """What fp8 experts compute with fp8 activations (w8a8): `fused_moe_reference_fp32`'s contract, with both
    GEMMs' activations quantized per row.

    hidden [T, H]; w13 [S, 2I, H], w2 [S, H, I] float8_e4m3fn QuantizedWeights; routing ids [T, k]; slot_map
    [E] or None (-1 = not here). Returns [T, H] float32, not rounded. Per (token, k) pair on slot s:
        x   = dequantize(quantize(hidden[t]))                             per token, fp32
        i   = silu(x @ w1[s]^T) * (x @ w3[s]^T), in fp32, rounded to hidden's dtype   (GEMM 1's output)
        y   = weight[t, k] * dequantize(quantize(i)) @ w2[s]^T           per pair row, fp32
    with the weights dequantized in fp32 (data * scale, not rounded to 16 bits), and the k rows of a token
    summed in fp32 in k order. The Triton w8a8 kernels differ from this only in fp32 summation order (and
    where that order moves GEMM 1's rounded output across an e4m3 rounding boundary).
    """
    if not (isinstance(w13, QuantizedWeight) and isinstance(w2, QuantizedWeight)
            and w13.dtype == w2.dtype == torch.float8_e4m3fn):
        raise ValueError("w8a8 needs float8_e4m3fn QuantizedWeights for w13 and w2")
    T, H = hidden.shape
    x = quantize_activations_reference(hidden).dequantize()  # [T, H] fp32
    w13f, w2f = w13.dequantize(torch.float32), w2.dequantize(torch.float32)  # [S, 2I, H], [S, H, I]
    ids = routing.ids.long()  # [T, k]
    slots = ids if slot_map is None else slot_map.to(ids.device).long()[ids]  # [T, k], -1 = not here
    pairs = torch.zeros(T, ids.shape[1], H, dtype=torch.float32, device=hidden.device)  # [T, k, H]
    for s in torch.unique(slots[slots >= 0]).tolist():
        token_idx, kpos = torch.where(slots == s)
        gate, up = F.linear(x[token_idx], w13f[s]).chunk(2, dim=-1)  # [n, I] each
        inter = (F.silu(gate) * up).to(hidden.dtype)  # [n, I], rounded as GEMM 1 stores it
        y = F.linear(quantize_activations_reference(inter).dequantize(), w2f[s])  # [n, H]
        pairs[token_idx, kpos] = y * routing.weights[token_idx, kpos, None]
    return pairs.sum(dim=1)  # [T, H] fp32
