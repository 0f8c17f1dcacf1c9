"""Load a Hugging Face checkpoint of a supported MoE family (config.json + one or several safetensors files)
into the model of its family (`model.registry`).

1. Check everything before reading a weight (`CheckpointFiles`): a problem is a `CheckpointError` naming
   the tensor and the file.
2. Build the model on the meta device with the caller's `ModelParts` (the kernels, and the experts its
   `ExpertsBuilder` makes: all local by default, offloaded or sharded ones from `moe_runtime.offload` and
   `moe_runtime.cluster`), then give it empty storage on the target device in the target dtype (large
   weights on huge pages when the parts ask for them).
3. Read every tensor into place in file order, converting the dtype (`SafetensorsReader`: pread into the
   parameter itself, so no mmap page stays resident and no staging copy is made on CPU); the experts a
   layer's `Experts` holds are stacked as w13 [S, 2I, D] (gate rows, then up rows) and w2 [S, D, I]
   (`CheckpointLayout.read_expert`), every other tensor goes where `CheckpointLayout.runtime_location` says
   (q, k and v as one projection, a dense SwiGLU's gate and up as one). With `model.quantization` int8 or
   fp8 the experts are built in 8 bits (`QuantizedLocalExperts`) and each expert matrix is quantized per
   row as it is read (`kernels.quant.quantize_into`: the 16-bit tensor is staged, one matrix at a time).
   An FP8 checkpoint (config.json's `quantization_config`, `checkpoint/fp8.py`) keeps its experts in FP8
   (their scales broadcast to one per row; requantized to int8 with `model.quantization: int8`) and has
   its other FP8 weights dequantized to the model dtype as they are read.
4. `experts.finish(...)`: whatever the experts need once the rest is loaded (the offload store opens);
   then the kernels derive what they keep from their weights (`prepare_kernels`).
The model is returned only once every tensor is in place, so nothing half-loaded is ever used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_runtime.checkpoint.files import CheckpointFiles
from moe_runtime.checkpoint.fp8 import Fp8Checkpoint, checkpoint_fp8, scale_name
from moe_runtime.checkpoint.layout import layout_of, resolve_dtype
from moe_runtime.checkpoint.reader import SafetensorsReader
from moe_runtime.config import ModelConfig, ModelLoadConfig
from moe_runtime.errors import CheckpointError, ConfigError
from moe_runtime.kernels.quant import QuantizedWeight
from moe_runtime.model.causal_lm import CausalLM
from moe_runtime.model.layers import Linear, RotaryEmbedding
from moe_runtime.model.parts import ModelParts
from moe_runtime.model.registry import build_model


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
                 ) -> CausalLM:
    """The model the `model:` section asks for: the checkpoint's weights (`load_model`), or with
    `load_format: dummy` seeded random ones made on the device from config.json alone (`dummy_model`)."""
    if cfg.load_format == "dummy":
        from moe_runtime.checkpoint.dummy import dummy_model

        return dummy_model(read_config(model_dir), cfg.dtype, cfg.device, parts=parts,
                           quantization=cfg.quantization, quantize_dense=cfg.quantize_dense)
    return load_model(model_dir, cfg.dtype, cfg.device, parts=parts, progress=progress,
                      quantization=cfg.quantization, quantize_dense=cfg.quantize_dense)


def quantized_parts(parts: ModelParts, scheme: str, dense: bool = False) -> ModelParts:
    """`parts` with its experts' weights in `scheme` ("none": unchanged), and with `dense`
    (`model.quantize_dense`) its dense projections too. The experts builder must know how
    (`quantized`: local, offloaded and expert-parallel experts do); one that does not: a `ConfigError`."""
    if dense and scheme == "none":
        raise ConfigError("model.quantize_dense=true needs 8-bit experts to take the format from: set "
                          "model.quantization to one of ['int8', 'fp8'] (or load an FP8 checkpoint), or "
                          "model.quantize_dense=false")
    if scheme == "none":
        return parts
    parts = dataclasses.replace(parts, dense_quantization=scheme if dense else "none")
    quantized = getattr(parts.experts, "quantized", None)
    if quantized is None:
        raise ConfigError(
            f"model.quantization={scheme!r} is not supported with {type(parts.experts).__name__} yet; allowed "
            "there: ['none']"
        )
    return dataclasses.replace(parts, experts=quantized(scheme))


@dataclass(frozen=True)
class WeightFormats:
    """What a run's weights are stored in: the routed experts' and the dense projections' formats ("none":
    the model's dtype; "int8" / "fp8": kernels/quant.py)."""

    experts: str = "none"
    dense: str = "none"


def weight_formats(model_dir: str | Path | None, cfg: ModelLoadConfig) -> WeightFormats:
    """The formats `load_weights` will load `model_dir` in under the `model:` section, known before loading
    (the CPU kernel plan is measured for them): `model.quantization`, or an FP8 checkpoint's own
    (`experts_scheme`), and the dense projections' with `model.quantize_dense`. A `ConfigError` for
    quantize_dense without 8-bit experts. model_dir None: no checkpoint (a preset's shapes)."""
    fp8 = None if cfg.load_format == "dummy" or model_dir is None else checkpoint_fp8(model_dir)
    experts = experts_scheme(cfg.quantization, fp8)
    parts = quantized_parts(ModelParts(), experts, cfg.quantize_dense)  # validates the pair
    return WeightFormats(experts, parts.dense_quantization)


def experts_scheme(quantization: str, fp8: Fp8Checkpoint | None) -> str:
    """The experts' weight format: `model.quantization`, except that an FP8 checkpoint's experts stay FP8
    unless int8 is asked for (never widened back to 16 bits: they would take twice the memory for the same
    values).

    >>> experts_scheme("none", None), experts_scheme("none", Fp8Checkpoint("dynamic")), experts_scheme("int8", None)
    ('none', 'fp8', 'int8')
    """
    return "fp8" if fp8 is not None and quantization == "none" else quantization


def load_model(
    model_dir: str | Path,
    dtype: str = "auto",
    device: str = "auto",
    *,
    parts: ModelParts | None = None,
    progress: bool = False,
    quantization: str = "none",
    quantize_dense: bool = False,
) -> CausalLM:
    """Build the model of a HF checkpoint directory's family. Raises `CheckpointError` on any defect.

    parts: how the model computes (default: the reference arithmetic, all E experts local). Only the
    experts the layers' `Experts` hold (`Experts.held_experts`) are read here; every tensor is still checked.
    quantization: the experts' weights in 16 bits ("none") or quantized per row at load ("int8", "fp8");
    an FP8 checkpoint's experts stay FP8 with "none" (`experts_scheme`). quantize_dense: the dense
    projections in the experts' format too (an FP8 checkpoint's FP8 ones as they are).
    """
    cfg = read_config(model_dir)
    torch_dtype, dev = resolve_dtype(dtype, cfg), resolve_device(device)
    with CheckpointFiles(model_dir, cfg) as ckpt:
        parts = quantized_parts(parts if parts is not None else ModelParts(), experts_scheme(quantization, ckpt.fp8),
                                quantize_dense)
        with torch.device("meta"):
            model = build_model(cfg, parts)
        model = model.to(torch_dtype).to_empty(device=dev)
        if parts.huge_pages:
            _to_huge_pages(model)
        model.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta).to(dev)  # buffers are not in checkpoints
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        targets = _targets(model)
        order = sorted(targets, key=lambda n: (ckpt.location[n], n))  # sequential reads, file by file
        names = {n: ckpt.location[n] for n in order}
        names |= {scale_name(n): ckpt.location[scale_name(n)] for n in order if scale_name(n) in ckpt.location}
        with torch.no_grad(), SafetensorsReader(model_dir, names) as reader:
            for name in _progress(order, progress):
                dst = targets[name]
                if isinstance(dst, QuantizedWeight):
                    reader.read_weight(name, dst)  # quantized per row, or an FP8 checkpoint's own values
                else:
                    reader.copy_into(name, dst)  # FP8 values dequantized with their scale
        parts.experts.finish(model, str(model_dir), ckpt.location)
    model.prepare_kernels()
    return model.eval()


def _to_huge_pages(model: CausalLM) -> None:
    """Give every parameter of at least `hugepages.MIN_BYTES` fresh storage on transparent huge pages (not
    initialized: the weights are read into it next)."""
    from moe_runtime.kernels.cpu import hugepages

    for p in model.parameters():
        if p.numel() * p.element_size() >= hugepages.MIN_BYTES:
            p.data = hugepages.empty(tuple(p.shape), p.dtype)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight


def _targets(model: CausalLM) -> dict[str, torch.Tensor | QuantizedWeight]:
    """Hub tensor name -> where it goes in the model (each routed expert's three matrices into the slot of the
    `Experts` that holds it; rows of a `QuantizedWeight` for quantized experts and 8-bit dense projections)."""
    cfg = model.config
    layout, params = layout_of(cfg), dict(model.named_parameters())
    modules = dict(model.named_modules())
    targets = {}
    for name in layout.expected_tensors(cfg):
        if not layout.is_expert_tensor(name):
            param, rows = layout.runtime_location(cfg, name)
            owner, _, leaf = param.rpartition(".")
            module = modules.get(owner)
            dst = module.matrix if isinstance(module, Linear) and leaf == "weight" else params[param]
            targets[name] = dst if rows is None else dst[rows]
    for l, block in model.moe_blocks().items():
        experts = block.experts
        for slot, e in enumerate(experts.held_experts()):
            layout.read_expert(targets.__setitem__, l, e, experts.w13[slot], experts.w2[slot])
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
