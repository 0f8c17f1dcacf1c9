"""The references themselves: worked examples, align invariants, and the pieces composing to the whole."""

import doctest

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_cases import CASES, make_inputs, num_slots

import moe_runtime.kernels.reference as reference
from moe_runtime.kernels.reference import (
    align_reference,
    fused_moe_reference_fp32,
    grouped_gemm1_reference,
    grouped_gemm2_reference,
    max_blocks,
)


def test_docstring_examples():
    assert doctest.testmod(reference).failed == 0


@settings(max_examples=40, deadline=None)
@given(
    T=st.integers(0, 40),
    k=st.integers(1, 3),
    S=st.integers(1, 9),
    block_m=st.sampled_from([1, 2, 16]),
    seed=st.integers(0, 2**16),
)
def test_align_invariants(T, k, S, block_m, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, S, (T, k), generator=g)  # -1 = dropped
    a = align_reference(ids, S, block_m)
    flat = ids.flatten()
    assert a.sorted_ids.numel() == max_blocks(T * k, S, block_m) * block_m
    rows = a.sorted_ids.view(-1, block_m)  # [num_blocks, block_m]
    real = rows < T * k
    # every kept pair exactly once, no dropped pair, each in a block of its own slot
    kept = a.sorted_ids[a.sorted_ids < T * k].sort().values
    assert torch.equal(kept, torch.nonzero(flat >= 0).flatten().int())
    assert torch.equal(flat[rows[real].long()], a.block_slot[:, None].expand_as(rows)[real].long())
    # slots ascend, unused blocks only at the tail, each used block starts with a real row
    used = a.block_slot >= 0
    assert torch.equal(a.block_slot[used], a.block_slot[used].sort().values)
    assert not used[used.int().argmin() :].any() or used.all()
    assert real[used, 0].all() and not real[~used].any()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_pieces_compose_to_the_whole(case):
    x = make_inputs(case, torch.float32)
    a = align_reference(x.slot_ids, num_slots(x), block_m=16)
    inter = grouped_gemm1_reference(x.hidden, x.w13, a)  # [T*k, I]
    rows = grouped_gemm2_reference(inter, x.w2, a, x.routing.weights)  # [T, k, H]
    want = fused_moe_reference_fp32(x.hidden, x.w13, x.w2, x.routing, x.slot_map)
    torch.testing.assert_close(rows.sum(dim=1), want, atol=1e-5, rtol=0)
