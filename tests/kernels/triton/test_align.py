"""Triton align vs `align_reference`: exact, element for element, on every case and two block sizes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_cases import CASES, make_inputs, num_slots

from moe_runtime.kernels.reference import align_reference
from moe_runtime.kernels.triton.align import align

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("block_m", [16, 32])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_reference_exactly(case, block_m):
    x = make_inputs(case, torch.float32, DEVICE)
    got = align(x.slot_ids, num_slots(x), block_m)
    want = align_reference(x.slot_ids, num_slots(x), block_m)
    assert torch.equal(got.sorted_ids, want.sorted_ids)
    assert torch.equal(got.block_slot, want.block_slot)
    assert (got.top_k, got.block_m) == (case.k, block_m)


def test_docstring_example():
    got = align(torch.tensor([[2, 0], [0, 1], [2, 0]], device=DEVICE), num_slots=4, block_m=16)
    assert got.sorted_ids[:16].tolist() == [1, 2, 5] + [6] * 13
    assert got.block_slot.tolist() == [0, 1, 2, -1, -1]  # cdiv(6, 16) + 4 blocks


def test_more_pairs_than_one_chunk():
    # 300 tokens x 2 > the kernel's 256-pair chunk: the running prefix sum must carry over.
    ids = torch.randint(0, 8, (300, 2), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    got, want = align(ids, 8, 16), align_reference(ids, 8, 16)
    assert torch.equal(got.sorted_ids, want.sorted_ids) and torch.equal(got.block_slot, want.block_slot)


def test_rejects_block_m_not_a_power_of_two():
    with pytest.raises(ValueError, match="block_m=24"):
        align(torch.zeros(2, 1, dtype=torch.int32, device=DEVICE), 4, 24)


@settings(max_examples=12, deadline=None)
@given(T=st.integers(1, 40), k=st.integers(1, 3), S=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_random_routings_match_reference(T, k, S, seed):
    ids = torch.randint(-1, S, (T, k), generator=torch.Generator().manual_seed(seed)).to(DEVICE)  # -1 = dropped
    got, want = align(ids, S, 16), align_reference(ids, S, 16)
    assert torch.equal(got.sorted_ids, want.sorted_ids) and torch.equal(got.block_slot, want.block_slot)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_writes_every_element(case, monkeypatch):
    """The outputs are allocated uninitialised: poison them and check the kernel overwrote all of it."""
    from moe_runtime.kernels.triton import align as align_module

    real_empty = torch.empty
    monkeypatch.setattr(align_module.torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(-777))
    x = make_inputs(case, torch.float32, DEVICE)
    got = align(x.slot_ids, num_slots(x), 16)
    monkeypatch.undo()
    want = align_reference(x.slot_ids, num_slots(x), 16)
    assert torch.equal(got.sorted_ids, want.sorted_ids) and torch.equal(got.block_slot, want.block_slot)
