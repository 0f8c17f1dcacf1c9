"""FP8 checkpoints: config.json's `quantization_config` with `quant_method: "fp8"`, as vLLM and
llm-compressor / AutoFP8 write them, and how their tensors become the runtime's weights.

    config.json   "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic" | "static",
                                          "ignored_layers": [...]}            (other keys are not read)
    tensors       X.weight        F8_E4M3 [N, K]        the quantized values of a linear layer
                  X.weight_scale  F32 / BF16 / F16, [] or [1] (per tensor) or [N] / [N, 1] (per channel)
                  X.input_scale   static activation scales: accepted, not used (the experts run w8a16)
    w[n, k] = weight[n, k] * weight_scale (per tensor) or weight_scale[n] (per channel)
Which layers are FP8 is read from the tensors themselves (an F8_E4M3 weight with its scale); the rest
(`ignored_layers`: usually lm_head and the routers, in 16 bits) load as usual. Routed experts stay FP8 in
the runtime (`QuantizedWeight`, the scale broadcast to one per row: same values), or are requantized with
`model.quantization: int8`; every other FP8 weight is dequantized to the model dtype at load.
Block-wise FP8 (`weight_block_size`, DeepSeek-V3 style) and other methods (gptq, awq, compressed-tensors,
...) are refused in one line naming the method.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe_runtime.errors import CheckpointError

METHODS = ("fp8",)  # quantization_config.quant_method values we load
ACTIVATION_SCHEMES = ("dynamic", "static")
FP8_DTYPE = "F8_E4M3"  # safetensors code of the values; torch.float8_e4m3fn
SCALE_DTYPES = ("F32", "BF16", "F16")  # safetensors codes a weight_scale may have (read as fp32)
SCALE_SUFFIX = "_scale"  # X.weight -> X.weight_scale
INPUT_SCALE = ".input_scale"


@dataclass(frozen=True)
class Fp8Checkpoint:
    """An FP8 checkpoint's `quantization_config` (module docstring)."""

    activation_scheme: str  # "dynamic" or "static" (static ships input_scale tensors, unused here)


def read_quantization_config(hf: dict[str, Any], source: str = "config.json") -> Fp8Checkpoint | None:
    """The FP8 format of a checkpoint from its config.json dict; None without `quantization_config`.

    Raises `CheckpointError` (one line, naming the value and what is allowed) for another quant_method,
    block-wise scales or an unknown activation scheme.

    >>> read_quantization_config({"quantization_config": {"quant_method": "fp8"}})
    Fp8Checkpoint(activation_scheme='dynamic')
    >>> read_quantization_config({}) is None
    True
    """
    qc = hf.get("quantization_config")
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method not in METHODS:
        raise CheckpointError(f"{source}: quantization_config.quant_method={method!r} is not supported; "
                              f"allowed: {list(METHODS)} (or no quantization_config: a 16-bit checkpoint)")
    if qc.get("weight_block_size") is not None:
        raise CheckpointError(f"{source}: quantization_config.weight_block_size={qc['weight_block_size']!r} "
                              "(block-wise FP8 scales) is not supported; allowed: per-tensor or per-channel "
                              "weight_scale (no weight_block_size)")
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme not in ACTIVATION_SCHEMES:
        raise CheckpointError(f"{source}: quantization_config.activation_scheme={scheme!r} is not supported; "
                              f"allowed: {list(ACTIVATION_SCHEMES)}")
    return Fp8Checkpoint(activation_scheme=scheme)


def checkpoint_fp8(model_dir: str | Path) -> Fp8Checkpoint | None:
    """The FP8 format of the checkpoint in `model_dir` (its config.json's `quantization_config`), or None.
    An unreadable config.json reads as None here: `read_config` is what reports it."""
    path = Path(model_dir) / "config.json"
    try:
        hf = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return read_quantization_config(hf if isinstance(hf, dict) else {}, str(path))


def scale_name(weight: str) -> str:
    """The scale tensor of an FP8 weight: 'model.layers.0.self_attn.q_proj.weight' -> '...weight_scale'."""
    return weight + SCALE_SUFFIX


def is_scale_tensor(name: str) -> bool:
    """Whether a tensor name is an FP8 checkpoint's scale (a weight's or a static input scale)."""
    return name.endswith(".weight" + SCALE_SUFFIX) or name.endswith(INPUT_SCALE)


def check_fp8_weight(name: str, shape: tuple[int, ...], scale_dtype: str | None, scale_shape: tuple[int, ...] | None,
                     where: str) -> None:
    """Raise `CheckpointError` naming the tensor and `where` (its file) unless FP8 weight `name` [N, ...]
    has a scale of a float dtype with one value (per tensor) or N (per channel)."""
    if scale_dtype is None:
        raise CheckpointError(f"{where}: tensor {name} is {FP8_DTYPE} but its scale {scale_name(name)} is "
                              "missing (an FP8 checkpoint stores one weight_scale per quantized weight)")
    if scale_dtype not in SCALE_DTYPES:
        raise CheckpointError(f"{where}: tensor {scale_name(name)} has dtype {scale_dtype}; allowed: "
                              f"{list(SCALE_DTYPES)}")
    numel = 1
    for d in scale_shape or ():
        numel *= d
    rows = shape[0] if shape else 1
    if numel not in (1, rows) or len(scale_shape or ()) > 2:
        raise CheckpointError(f"{where}: tensor {scale_name(name)} has shape {list(scale_shape or ())}; allowed: "
                              f"[] or [1] (per tensor), [{rows}] or [{rows}, 1] (per channel of {name})")


def check_no_nan(name: str, data: torch.Tensor, where: str) -> None:
    """Raise `CheckpointError` naming tensor `name` and `where` if float8_e4m3fn `data` holds a NaN (bytes
    0x7F and 0xFF). 8-bit weights are kept as they are only when finite: the native CPU tiles widen the
    finite bytes alone (kernels/cpu/dot_bf16.h), and a NaN weight makes every output it reaches NaN anyway."""
    bad = int(((data.view(torch.uint8) & 0x7F) == 0x7F).sum())
    if bad:
        raise CheckpointError(f"{where}: tensor {name} holds {bad} NaN value(s) as {FP8_DTYPE}; allowed: finite "
                              "values (a NaN weight is a broken checkpoint)")


def row_scales(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """A weight_scale (per tensor or per channel) as one fp32 scale per row: [rows]. Same values."""
    flat = scale.to(torch.float32).reshape(-1)
    return flat.expand(rows).contiguous() if flat.numel() == 1 else flat.clone()


def dequantize(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """data [N, ...] F8 and its weight_scale -> data * scale in fp32, rounded once to `dtype`."""
    rows = row_scales(scale, data.shape[0] if data.dim() else 1)
    return (data.float() * rows.view(-1, *([1] * (data.dim() - 1)))).to(dtype)
