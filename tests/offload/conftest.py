"""Fixtures for the expert-store tests: a greedy decoding loop over `model.forward`, and an in-memory tier."""

from __future__ import annotations

import pytest
import torch

from moe_runtime.kernels.attention import AttentionMetadata


def greedy_tokens(model, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy decoding of all prompts together in one flat batch, full recompute each step (no KV cache)."""
    seqs = [list(p) for p in prompts]
    for _ in range(steps):
        ids = torch.tensor([t for s in seqs for t in s], device=model.device)
        positions = torch.cat([torch.arange(len(s)) for s in seqs]).to(model.device)
        meta = AttentionMetadata.for_prompts([len(s) for s in seqs])
        hidden = model(ids, positions, meta)  # [T, D]
        last = torch.tensor(meta.query_start_loc[1:], device=model.device) - 1  # each sequence's last row
        for s, tok in zip(seqs, model.compute_logits(hidden[last]).argmax(-1).tolist(), strict=True):
            s.append(tok)
    return [s[len(p):] for s, p in zip(seqs, prompts, strict=True)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these tiny shapes run 10x slower when two threads fight over shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def greedy():
    return greedy_tokens


class InMemoryTier:
    """A host tier over given weights (w13[l] [E, 2I, D], w2[l] [E, D, I]) that counts what it serves."""

    reads_storage = False

    def __init__(self, w13: list[torch.Tensor], w2: list[torch.Tensor]):
        self.w13, self.w2 = w13, w2
        self.copies: list[tuple[int, int]] = []

    def copy_into(self, layer, expert, w13, w2) -> int:
        self.copies.append((layer, expert))
        w13.copy_(self.w13[layer][expert])
        w2.copy_(self.w2[layer][expert])
        return (w13.numel() + w2.numel()) * w13.element_size()

    def host_weights(self, layer, experts):
        slot_map = torch.full((self.w13[layer].shape[0],), -1, dtype=torch.int32)
        slot_map[experts] = torch.tensor(experts, dtype=torch.int32)
        return self.w13[layer], self.w2[layer], slot_map

    def close(self) -> None:
        pass


@pytest.fixture(scope="session")
def tier_factory():
    def make(L: int, E: int, D: int, I: int, seed: int = 0) -> InMemoryTier:  # noqa: E741
        g = torch.Generator().manual_seed(seed)
        w13 = [torch.randn(E, 2 * I, D, generator=g) / 10 for _ in range(L)]
        w2 = [torch.randn(E, D, I, generator=g) / 10 for _ in range(L)]
        return InMemoryTier(w13, w2)

    return make
