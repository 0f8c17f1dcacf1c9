"""A model of a checkpoint's shapes with seeded random weights made on the device (`model.load_format: dummy`).

Benchmarks of shapes whose weights are not on disk (Mixtral-8x7B is ~94 GB in bf16; a lent GPU has a
64 GB disk) need only the published config.json (configs/models/). Every weight is drawn on the target
device from one generator seeded by `seed`, so two runs build the same model: std 0.02 like Hugging Face's
initializer for matrices (and biases), ones for the norms (q/k norms too). The routers are random too, so experts are picked about
uniformly: the worst case for an expert cache, the common case for a GPU that holds every expert.
"""

from __future__ import annotations

import torch

from moe_runtime.checkpoint.layout import resolve_dtype
from moe_runtime.config import ModelConfig
from moe_runtime.kernels.quant import quantize_into
from moe_runtime.model.causal_lm import CausalLM
from moe_runtime.model.experts import QuantizedLocalExperts
from moe_runtime.model.layers import Linear, RMSNorm, RotaryEmbedding
from moe_runtime.model.parts import ModelParts
from moe_runtime.model.registry import build_model

INIT_STD = 0.02


@torch.no_grad()
def dummy_model(cfg: ModelConfig, dtype: str = "auto", device: str = "auto", *, parts: ModelParts | None = None,
                seed: int = 0, quantization: str = "none", quantize_dense: bool = False) -> CausalLM:
    """The model of `cfg`'s family with random weights on `device` (no file is read). Quantized experts
    (`quantization` int8 / fp8) and, with `quantize_dense`, dense projections get the quantization of random
    weights drawn in the model's dtype."""
    from moe_runtime.checkpoint.loader import quantized_parts, resolve_device  # the loader imports us lazily

    parts = quantized_parts(parts if parts is not None else ModelParts(), quantization, quantize_dense)
    torch_dtype, dev = resolve_dtype(dtype, cfg), resolve_device(device)
    with torch.device("meta"):
        model = build_model(cfg, parts)
    model = model.to(torch_dtype).to_empty(device=dev)
    model.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta).to(dev)  # buffers are not weights
    gen = torch.Generator(device=dev).manual_seed(seed)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    quantized = {}  # id of an 8-bit parameter -> its QuantizedWeight, [S, N, K] or [N, K]
    for m in model.modules():
        if isinstance(m, QuantizedLocalExperts):
            quantized.update({id(m.w13_data): m.w13, id(m.w2_data): m.w2})
        elif isinstance(m, Linear) and m.scheme != "none":
            quantized[id(m.weight_data)] = m.matrix
    scales = {id(q.scale) for q in quantized.values()}
    for p in model.parameters():
        if id(p) in norms:
            p.fill_(1.0)
        elif id(p) in quantized:
            q = quantized[id(p)]
            # one matrix at a time (an expert of a stack, or a dense projection): no 16-bit copy of a stack
            for s in range(q.shape[0]) if q.data.dim() == 3 else [slice(None)]:
                w = torch.empty(q[s].shape, dtype=torch_dtype, device=dev).normal_(0.0, INIT_STD, generator=gen)
                quantize_into(w, q.data[s], q.scale[s])
        elif id(p) not in scales:
            p.normal_(0.0, INIT_STD, generator=gen)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    parts.experts.finish(model, "", {})
    model.prepare_kernels()
    return model.eval()
