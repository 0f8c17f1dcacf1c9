"""Greedy decoding three ways, for parity with transformers: the reference's `generate`, our model with full
recompute, and our model through a paged KV cache whose blocks are shuffled through the pool.

Importable from every test folder (tests/ is on pytest's pythonpath, pyproject.toml).
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from moe_runtime.kernels.attention import AttentionMetadata

NEW_TOKENS = 32
PROMPT = [1, 17, 245, 3, 99, 870, 12, 5, 640, 33, 7]


def hf_greedy(model, prompt, n):
    gen = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), generation_config=gen)
    return out[0, len(prompt):].tolist()


def greedy_recompute(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        h = model(torch.tensor(ids), torch.arange(len(ids)), AttentionMetadata.for_prompts([len(ids)]))
        ids.append(int(model.compute_logits(h[-1:]).argmax(-1)))
    return ids[len(prompt):]


def greedy_paged(model, prompt, n, block_size=4):
    """Prefill then one-token decode steps through a paged KV cache whose blocks are shuffled."""
    cfg = model.config
    num_blocks = (len(prompt) + n) // block_size + 2
    caches = [
        (torch.zeros(num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim, dtype=model.dtype),
         torch.zeros(num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim, dtype=model.dtype))
        for _ in range(cfg.num_hidden_layers)
    ]
    table = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0))[None, :]  # [1, blocks]
    ids, out = list(prompt), []
    step_ids, start = list(prompt), 0
    for _ in range(n):
        positions = torch.arange(start, start + len(step_ids))
        slots = table[0, positions // block_size] * block_size + positions % block_size
        meta = AttentionMetadata([0, len(step_ids)], [start + len(step_ids)], slots, table)
        h = model(torch.tensor(step_ids), positions, meta, caches)
        token = int(model.compute_logits(h[-1:]).argmax(-1))
        out.append(token)
        ids.append(token)
        start, step_ids = len(ids) - 1, [token]
    return out
