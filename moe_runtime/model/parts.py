"""How a model computes, chosen once where the model is built (the executor, by device and config).

The model file names no device and no kernel: each module asks for the kernel its `ModelParts` names,
when it is constructed. Kernel names here are concrete; whoever builds the model resolves "auto" for its
device first (`moe_runtime.engine.parts.choose_parts`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_runtime.kernels.cpu.dispatch import CpuPlan
from moe_runtime.model.experts import ExpertsBuilder, LocalExpertsBuilder


@dataclass(frozen=True)
class ModelParts:
    """The defaults are the reference implementation's arithmetic on any device (parity tests)."""

    # Where each MoE layer's experts live and which fused-MoE kernel runs them (local, offloaded, sharded).
    experts: ExpertsBuilder = field(default_factory=LocalExpertsBuilder)
    attention: str = "torch"  # RoPE + KV write + attention: kernels.attention.ATTENTION_BACKENDS
    norm: str = "torch"  # RMSNorm with the fused residual add: kernels.norm.RMS_NORM_BACKENDS
    linear: str = "torch"  # dense projections: kernels.linear.LINEAR_BACKENDS
    # The dense projections' weight format: "none" (the model's dtype) or an 8-bit scheme of
    # kernels.quant.SCHEMES (`model.quantize_dense`); a head tied to the embedding keeps the embedding's.
    dense_quantization: str = "none"
    # Weights of kernels.cpu.hugepages.MIN_BYTES or more on transparent huge pages, where Linux gives them
    # (a CPU decode step streams every weight; fewer TLB misses). Values unchanged.
    huge_pages: bool = False
    # Which implementation each `cpu` linear runs per row count, measured on this machine
    # (kernels/cpu/dispatch.py); None: the defaults. The experts' plan travels in `experts`.
    cpu_plan: CpuPlan | None = None
