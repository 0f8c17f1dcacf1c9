"""The engine tests' prompts and their oracle: a plain greedy loop without a KV cache.

Importable from every test folder (tests/ is on pytest's pythonpath, pyproject.toml).
"""

from __future__ import annotations

import torch

from moe_runtime.kernels.attention import AttentionMetadata

# Prompts of mixed lengths (token ids of the tiny vocab; 1 is BOS).
PROMPTS = (
    [1, 300, 301, 302],
    [1, 17],
    [1, *range(40, 77)],  # 38 tokens: several 16-token blocks
    [1, 900, 5, 1200, 33, 7, 7, 7, 2000, 64, 128],
)


def reference_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    """The oracle: a plain loop that re-runs the whole sequence without a KV cache for every token."""
    ids = list(prompt)
    for _ in range(max_tokens):
        meta = AttentionMetadata.for_prompts([len(ids)])
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), meta, None)
        ids.append(int(model.compute_logits(hidden[-1:]).argmax()))
    return ids[len(prompt) :]


def reference_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), V] of a whole sequence without a KV cache."""
    meta = AttentionMetadata.for_prompts([len(ids)])
    return model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), meta, None))
