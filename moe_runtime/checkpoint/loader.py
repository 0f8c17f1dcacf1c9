"""Load a Hugging Face Mixtral checkpoint (config.json + one or several safetensors files) into the model.

1. Check everything before reading a weight (`CheckpointFiles`): a problem is a `CheckpointError` naming
   the tensor and the file.
2. Build the model on the meta device with the caller's `ModelParts` (the kernels, and the experts its
   `ExpertsBuilder` makes: all local by default, offloaded or sharded ones from `moe_runtime.offload` and
   `moe_runtime.cluster`), then give it empty storage on the target device in the target dtype (large
   weights on huge pages when the parts ask for them).
3. Read every tensor into place in file order, converting the dtype (`SafetensorsReader`: pread into the
   parameter itself, so no mmap page stays resident and no staging copy is made on CPU); the experts a
   layer's `Experts` holds are stacked as w13 [S, 2I, D] (gate rows, then up rows) and w2 [S, D, I]
   (`layout.read_expert`), q, k and v as one projection (`layout.qkv_rows`).
4. `experts.finish(...)`: whatever the experts need once the rest is loaded (the offload store opens);
   then the kernels derive what they keep from their weights (`prepare_kernels`).
The model is returned only once every tensor is in place, so nothing half-loaded is ever used.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from moe_runtime.checkpoint.files import CheckpointFiles
from moe_runtime.checkpoint.layout import qkv_rows, read_expert, resolve_dtype
from moe_runtime.checkpoint.reader import SafetensorsReader
from moe_runtime.config import ModelConfig, ModelLoadConfig
from moe_runtime.errors import CheckpointError, ConfigError
from moe_runtime.model.mixtral import MixtralForCausalLM, RotaryEmbedding
from moe_runtime.model.parts import ModelParts


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r}: CUDA is not available on this host; allowed here: ['auto', 'cpu']")
    return torch.device(device)


def read_config(model_dir: str | Path) -> ModelConfig:
    """The checkpoint's config.json; a `CheckpointError` naming the file when it is missing or bad."""
    try:
        return ModelConfig.from_pretrained(model_dir)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def load_weights(model_dir: str | Path, cfg: ModelLoadConfig, parts: ModelParts, progress: bool = False
                 ) -> MixtralForCausalLM:
    """The model the `model:` section asks for: the checkpoint's weights (`load_model`), or with
    `load_format: dummy` seeded random ones made on the device from config.json alone (`dummy_model`)."""
    if cfg.load_format == "dummy":
        from moe_runtime.checkpoint.dummy import dummy_model

        return dummy_model(read_config(model_dir), cfg.dtype, cfg.device, parts=parts)
    return load_model(model_dir, cfg.dtype, cfg.device, parts=parts, progress=progress)


def load_model(
    model_dir: str | Path,
    dtype: str = "auto",
    device: str = "auto",
    *,
    parts: ModelParts | None = None,
    progress: bool = False,
) -> MixtralForCausalLM:
    """Build a `MixtralForCausalLM` from a HF checkpoint directory. Raises `CheckpointError` on any defect.

    parts: how the model computes (default: the reference arithmetic, all E experts local). Only the
    experts the layers' `Experts` hold (`Experts.held_experts`) are read here; every tensor is still checked.
    """
    parts = parts if parts is not None else ModelParts()
    cfg = read_config(model_dir)
    torch_dtype, dev = resolve_dtype(dtype, cfg), resolve_device(device)
    with CheckpointFiles(model_dir, cfg) as ckpt:
        with torch.device("meta"):
            model = MixtralForCausalLM(cfg, parts)
        model = model.to(torch_dtype).to_empty(device=dev)
        if parts.huge_pages:
            _to_huge_pages(model)
        model.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta).to(dev)  # buffers are not in checkpoints
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        targets = _targets(model)
        order = sorted(targets, key=lambda n: (ckpt.location[n], n))  # sequential reads, file by file
        with torch.no_grad(), SafetensorsReader(model_dir, {n: ckpt.location[n] for n in order}) as reader:
            for name in _progress(order, progress):
                reader.copy_into(name, targets[name])
        parts.experts.finish(model, str(model_dir), ckpt.location)
    model.prepare_kernels()
    return model.eval()


def _to_huge_pages(model: MixtralForCausalLM) -> None:
    """Give every parameter of at least `hugepages.MIN_BYTES` fresh storage on transparent huge pages (not
    initialized: the weights are read into it next)."""
    from moe_runtime.kernels.cpu import hugepages

    for p in model.parameters():
        if p.numel() * p.element_size() >= hugepages.MIN_BYTES:
            p.data = hugepages.empty(tuple(p.shape), p.dtype)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight


def _targets(model: MixtralForCausalLM) -> dict[str, torch.Tensor]:
    """Hub tensor name -> where it goes in the model (each expert's three matrices into the slot of the
    `Experts` that holds it)."""
    targets = {"model.embed_tokens.weight": model.embed_tokens.weight, "model.norm.weight": model.norm.weight}
    if not model.config.tie_word_embeddings:
        targets["lm_head.weight"] = model.lm_head.weight
    for l, layer in enumerate(model.layers):
        p = f"model.layers.{l}."
        targets[p + "input_layernorm.weight"] = layer.input_layernorm.weight
        targets[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
        for proj, rows in qkv_rows(model.config).items():
            targets[f"{p}self_attn.{proj}.weight"] = layer.self_attn.qkv_proj.weight[rows]
        targets[p + "self_attn.o_proj.weight"] = layer.self_attn.o_proj.weight
        moe = layer.block_sparse_moe
        targets[p + "block_sparse_moe.gate.weight"] = moe.gate.weight
        for slot, e in enumerate(moe.experts.held_experts()):
            read_expert(targets.__setitem__, l, e, moe.experts.w13[slot], moe.experts.w2[slot])
    return targets


def _progress(names: list[str], enabled: bool) -> Iterator[str]:
    if not enabled:
        yield from names
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("loading weights", total=len(names))
        for name in names:
            yield name
            bar.advance(task)
