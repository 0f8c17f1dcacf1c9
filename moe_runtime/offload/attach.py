"""Wire an `ExpertStore` into a loaded model: every `SparseMoeBlock` then runs its experts through it.

`moe_runtime.model.loader.load_model(..., offload=cfg.offload)` calls this after loading everything but
the experts; the blocks' own `w13`/`w2` stay empty, so no expert is ever materialized on the device except
in the store's slots (and, with the `mmap` tier, none in host memory either).
"""

from __future__ import annotations

from pathlib import Path

import torch

from moe_runtime.config import OffloadConfig
from moe_runtime.offload.cost_model import CostModel
from moe_runtime.offload.host_tier import MmapTier, PinnedTier, expert_names
from moe_runtime.offload.safetensors_reader import SafetensorsReader
from moe_runtime.offload.store import ExpertStore, LayerExperts


def is_expert_tensor(name: str) -> bool:
    """Hub names of expert matrices (`...block_sparse_moe.experts.{e}.w1|w2|w3.weight`)."""
    return ".block_sparse_moe.experts." in name


def attach_expert_store(model, model_dir: str | Path, offload: OffloadConfig, location: dict[str, str],
                        cost: CostModel | None = None) -> ExpertStore:
    """Build the store for `model` (a `MixtralForCausalLM` on its device, experts not loaded) and attach it.

    location: tensor name -> safetensors file, as `CheckpointFiles.location` gives it.
    Returns the store, also reachable as `model.expert_store`.
    """
    cfg, device, dtype = model.config, model.device, model.dtype
    reader = SafetensorsReader(model_dir, {n: f for n, f in location.items() if is_expert_tensor(n)})
    assert all(name in reader.locations for name in expert_names(cfg.num_hidden_layers - 1, cfg.num_local_experts - 1))
    if offload.host_tier == "mmap":
        tier = MmapTier(reader, cfg, dtype)
    else:
        tier = PinnedTier(reader, cfg, dtype, pin=device.type == "cuda")
        reader.close()
    gates = [layer.block_sparse_moe.gate for layer in model.layers]
    store = ExpertStore(cfg, offload, tier, gates, device, dtype, cost)
    for i, layer in enumerate(model.layers):
        layer.block_sparse_moe.experts = LayerExperts(store, i)
    model.expert_store = store
    return store


def empty_experts(model) -> None:
    """Replace every block's w13/w2 with zero-expert tensors [0, ...] so they take no memory."""
    for layer in model.layers:
        moe = layer.block_sparse_moe
        for name in ("w13", "w2"):
            shape = (0, *getattr(moe, name).shape[1:])
            setattr(moe, name, torch.nn.Parameter(torch.empty(shape, device=getattr(moe, name).device,
                                                              dtype=getattr(moe, name).dtype), requires_grad=False))
