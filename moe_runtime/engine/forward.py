"""How the model runner runs the model on a step: one implementation, chosen once when the runner is built.

    EagerForward      the model's forward, op by op (every device; the reference for the others)
    CpuDecodeForward  decode steps as a few native calls per layer (engine/cpu_decode.py; CPU fast paths)
    CudaGraphForward  decode steps replayed from CUDA graphs captured per batch size (engine/cuda_graphs.py)
Each returns the final hidden states of the step's tokens and the step's router counts [L, E] (tokens
routed to each expert, on the device, for telemetry). The last two fall back to `EagerForward` for steps
they do not take (prompt chunks, batches past their size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from moe_runtime.kernels.attention import AttentionMetadata, KVCache
from moe_runtime.model.causal_lm import CausalLM

# T flat tokens, B sequences, D hidden, L layers, E experts


@dataclass
class StepInputs:
    """A step's flat batch on the model's device, built once by the runner."""

    input_ids: torch.Tensor  # [T] integer token ids
    positions: torch.Tensor  # [T] integer positions
    meta: AttentionMetadata  # sequences, KV slots and pages
    decode: bool  # every sequence adds one token to a cached context (graphs and native decode take these)


class StepForward(Protocol):
    def __call__(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (hidden [T, D], router counts [L, E] int64), both on the model's device."""


class EagerForward:
    def __init__(self, model: CausalLM, kv_caches: list[KVCache]):
        self.model, self.kv_caches = model, kv_caches

    def __call__(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta, self.kv_caches)  # [T, D]
        return hidden, self.model.router_counts(hidden.shape[0])
