"""Align: sort (token, k) pairs by resident slot and pad each slot's run to whole M-blocks.

The grouped GEMMs then give every M-block exactly one slot (one expert's weights) and mask the padding.
Reference and worked example: `reference.align_reference`. The result is exact (no floating point), and
pairs keep their flat order inside a slot, so the kernel and the reference agree element for element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_runtime.kernels.reference import AlignedRouting, max_blocks


@triton.jit
def _align_kernel(
    # Pointers
    slot_ids_ptr,  # [N] int32 slot of each flat pair, -1 = dropped
    sorted_ids_ptr,  # [num_blocks * BLOCK_M] int32, written whole: pair ids, N for padding
    block_slot_ptr,  # [num_blocks] int32, written whole: slot of each M-block, -1 for unused ones
    # Dimensions
    N,  # T * k pairs
    num_blocks,  # static bound on M-blocks (`max_blocks`)
    # Meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr,  # next power of two >= S
    CHUNK: tl.constexpr,  # pairs read per step
):
    # -----------------------------------------------------------
    # One program per slot. First every program counts all slots, so each knows where its own padded
    # run starts without talking to the others (S programs x N reads: N is small, the GEMMs dominate).
    slot = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    counts = tl.zeros((BLOCK_S,), dtype=tl.int32)
    for start in range(0, N, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        ids = tl.load(slot_ids_ptr + offs, mask=offs < N, other=-1)
        counts += tl.sum((ids[:, None] == offs_s[None, :]).to(tl.int32), axis=0)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M  # [BLOCK_S] M-blocks per slot
    first_block = tl.sum(tl.where(offs_s < slot, blocks, 0), axis=0)
    my_blocks = tl.sum(tl.where(offs_s == slot, blocks, 0), axis=0)

    # -----------------------------------------------------------
    # Label this slot's M-blocks.
    for b in range(0, my_blocks):
        tl.store(block_slot_ptr + first_block + b, slot)

    # -----------------------------------------------------------
    # Write this slot's pairs in flat order: position = pairs of this slot seen so far (a running
    # prefix sum over the chunks).
    row = first_block * BLOCK_M
    for start in range(0, N, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        ids = tl.load(slot_ids_ptr + offs, mask=offs < N, other=-1)
        mine = (ids == slot).to(tl.int32)
        pos = row + tl.cumsum(mine, axis=0) - mine  # exclusive prefix sum
        tl.store(sorted_ids_ptr + pos, offs, mask=mine == 1)
        row += tl.sum(mine, axis=0)

    # -----------------------------------------------------------
    # Padding: the rest of this slot's last M-block (less than BLOCK_M rows) gets N. Slot 0's program also
    # marks the unused tail blocks of the static grid, so the outputs need no prefill (two launches fewer
    # per layer, which counts at decode).
    offs_m = tl.arange(0, BLOCK_M)
    pad = row + offs_m
    tl.store(
        sorted_ids_ptr + pad,
        tl.full((BLOCK_M,), 0, tl.int32) + N,
        mask=pad < (first_block + my_blocks) * BLOCK_M,
    )
    if slot == 0:
        for b in range(tl.sum(blocks, axis=0), num_blocks):
            tl.store(block_slot_ptr + b, -1)
            tl.store(sorted_ids_ptr + b * BLOCK_M + offs_m, tl.full((BLOCK_M,), 0, tl.int32) + N)


def align(slot_ids: torch.Tensor, num_slots: int, block_m: int) -> AlignedRouting:
    """Triton twin of `reference.align_reference`. slot_ids: [T, k] int, in [0, num_slots) or -1.

    Returns AlignedRouting with sorted_ids [num_blocks * block_m] and block_slot [num_blocks] int32,
    num_blocks = cdiv(T * k, block_m) + num_slots (a static bound, so CUDA graphs can capture it).
    """
    if slot_ids.dim() != 2:
        raise ValueError(f"slot_ids must be [T, k], got shape {tuple(slot_ids.shape)}")
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m={block_m} must be a power of two >= 16 (tl.dot's smallest M)")
    T, k = slot_ids.shape
    num_blocks = max_blocks(T * k, num_slots, block_m)
    if T * k == 0 or num_slots == 0:  # nothing to sort: all padding
        sorted_ids = torch.full((num_blocks * block_m,), T * k, dtype=torch.int32, device=slot_ids.device)
        block_slot = torch.full((num_blocks,), -1, dtype=torch.int32, device=slot_ids.device)
        return AlignedRouting(sorted_ids=sorted_ids, block_slot=block_slot, top_k=k, block_m=block_m)
    sorted_ids = torch.empty(num_blocks * block_m, dtype=torch.int32, device=slot_ids.device)
    block_slot = torch.empty(num_blocks, dtype=torch.int32, device=slot_ids.device)
    flat = slot_ids.reshape(-1).to(torch.int32).contiguous()  # [T*k]
    _align_kernel[(num_slots,)](
        flat, sorted_ids, block_slot,
        T * k, num_blocks,
        BLOCK_M=block_m, BLOCK_S=triton.next_power_of_2(num_slots), CHUNK=256,
    )  # fmt: skip
    return AlignedRouting(sorted_ids=sorted_ids, block_slot=block_slot, top_k=k, block_m=block_m)
