"""A model of a checkpoint's shapes with seeded random weights made on the device (`model.load_format: dummy`).

Benchmarks of shapes whose weights are not on disk (Mixtral-8x7B is ~94 GB in bf16; a lent GPU has a
64 GB disk) need only the published config.json (configs/models/). Every weight is drawn on the target
device from one generator seeded by `seed`, so two runs build the same model: std 0.02 like Hugging Face's
initializer for matrices, ones for the norms. The routers are random too, so experts are picked about
uniformly: the worst case for an expert cache, the common case for a GPU that holds every expert.
"""

from __future__ import annotations

import torch

from moe_runtime.checkpoint.layout import resolve_dtype
from moe_runtime.config import ModelConfig
from moe_runtime.model.mixtral import MixtralForCausalLM, RMSNorm, RotaryEmbedding
from moe_runtime.model.parts import ModelParts

INIT_STD = 0.02


@torch.no_grad()
def dummy_model(cfg: ModelConfig, dtype: str = "auto", device: str = "auto", *, parts: ModelParts | None = None,
                seed: int = 0) -> MixtralForCausalLM:
    """A `MixtralForCausalLM` for `cfg` with random weights on `device` (no file is read)."""
    from moe_runtime.checkpoint.loader import resolve_device  # the loader imports this module lazily

    parts = parts if parts is not None else ModelParts()
    torch_dtype, dev = resolve_dtype(dtype, cfg), resolve_device(device)
    with torch.device("meta"):
        model = MixtralForCausalLM(cfg, parts)
    model = model.to(torch_dtype).to_empty(device=dev)
    model.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta).to(dev)  # buffers are not weights
    gen = torch.Generator(device=dev).manual_seed(seed)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    for p in model.parameters():
        if id(p) in norms:
            p.fill_(1.0)
        else:
            p.normal_(0.0, INIT_STD, generator=gen)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    parts.experts.finish(model, "", {})
    model.prepare_kernels()
    return model.eval()
