"""Load a Hugging Face Mixtral checkpoint (config.json + one or several safetensors files) into the model.

1. Check everything before reading a weight (`CheckpointFiles`): a problem is a `CheckpointError` naming
   the tensor and the file.
2. Build the model on the meta device with the experts the caller's `ExpertsBuilder` makes (all local by
   default; offloaded or sharded ones from `moe_runtime.offload` and `moe_runtime.cluster`), then give it
   empty storage on the target device in the target dtype.
3. Read every tensor into place in file order, converting the dtype (`SafetensorsReader`: pread into the
   parameter itself, so no mmap page stays resident and no staging copy is made on CPU); the experts a
   layer's `Experts` holds are stacked as w13 [S, 2I, D] (gate rows, then up rows) and w2 [S, D, I]
   (`layout.read_expert`).
4. `experts.finish(...)`: whatever the experts need once the rest is loaded (the offload store opens).
The model is returned only once every tensor is in place, so nothing half-loaded is ever used.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from moe_runtime.checkpoint.files import CheckpointFiles
from moe_runtime.checkpoint.layout import read_expert, resolve_dtype
from moe_runtime.checkpoint.reader import SafetensorsReader
from moe_runtime.config import ModelConfig
from moe_runtime.errors import CheckpointError, ConfigError
from moe_runtime.model.experts import ExpertsBuilder, LocalExpertsBuilder
from moe_runtime.model.mixtral import MixtralForCausalLM, RotaryEmbedding


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r}: CUDA is not available on this host; allowed here: ['auto', 'cpu']")
    return torch.device(device)


def load_model(
    model_dir: str | Path,
    dtype: str = "auto",
    device: str = "auto",
    *,
    experts: ExpertsBuilder | None = None,
    progress: bool = False,
) -> MixtralForCausalLM:
    """Build a `MixtralForCausalLM` from a HF checkpoint directory. Raises `CheckpointError` on any defect.

    experts: makes each layer's `Experts` (default: all E experts local, on the `auto` MoE backend). Only
    the experts they hold (`Experts.held_experts`) are read here; every tensor is still checked.
    """
    experts = experts if experts is not None else LocalExpertsBuilder()
    try:
        cfg = ModelConfig.from_pretrained(model_dir)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    torch_dtype, dev = resolve_dtype(dtype, cfg), resolve_device(device)
    with CheckpointFiles(model_dir, cfg) as ckpt:
        with torch.device("meta"):
            model = MixtralForCausalLM(cfg, experts)
        model = model.to(torch_dtype).to_empty(device=dev)
        model.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta).to(dev)  # buffers are not in checkpoints
        for layer in model.layers:
            layer.block_sparse_moe.experts.routed_tokens.zero_()
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        targets = _targets(model)
        order = sorted(targets, key=lambda n: (ckpt.location[n], n))  # sequential reads, file by file
        with torch.no_grad(), SafetensorsReader(model_dir, {n: ckpt.location[n] for n in order}) as reader:
            for name in _progress(order, progress):
                reader.copy_into(name, targets[name])
        experts.finish(model, str(model_dir), ckpt.location)
    return model.eval()


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
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            targets[f"{p}self_attn.{proj}.weight"] = getattr(layer.self_attn, proj).weight
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
