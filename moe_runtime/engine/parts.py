"""The one place that picks how a model computes on a device: kernels, weight placement, step runner.

Executors call `choose_kernels` once, build the model with `ModelParts` from it, and the runner with
`make_forward`. Nothing downstream branches on the device again.

    device  exact   attention  norm    linear  MoE (auto)  steps
    cuda    false   triton     triton  fused   triton      CUDA graphs for decode (engine.cuda_graphs)
    cuda    true    torch      torch   torch   torch       eager
    cpu     false   cpu        torch   cpu     cpu         native decode steps; weights on huge pages
    cpu     true    torch      torch   torch   torch       eager
The CPU fast column applies to 16-bit weights (fp32 weights gain nothing from it: the exact column), and
its native parts to CPUs where the native kernels build (kernels/cpu; else torch's kernels, one warning).
`model.attention_backend` and `model.moe_backend` other than `auto` override their column.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from moe_runtime.config import EngineConfig, ModelLoadConfig
from moe_runtime.engine.cpu_decode import CpuDecodeForward
from moe_runtime.engine.forward import EagerForward, StepForward
from moe_runtime.kernels import cpu
from moe_runtime.kernels.attention import KVCache
from moe_runtime.model.mixtral import MixtralForCausalLM

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelChoice:
    attention: str  # kernels.attention.ATTENTION_BACKENDS
    norm: str  # kernels.norm.RMS_NORM_BACKENDS
    linear: str  # kernels.linear.LINEAR_BACKENDS
    moe: str  # kernels.backends.BACKENDS (the experts' fused-MoE kernel)
    huge_pages: bool  # large weights on transparent huge pages
    native_decode: bool  # decode steps through engine/cpu_decode.py


def choose_kernels(cfg: ModelLoadConfig, device: torch.device, dtype: torch.dtype) -> KernelChoice:
    """The kernels for `cfg` on `device` with weights in `dtype` (the table in the module docstring)."""
    if device.type == "cuda":
        fast = not cfg.exact
        choice = KernelChoice(
            attention="triton" if fast else "torch",
            norm="triton" if fast else "torch",
            linear="fused" if fast else "torch",
            moe="triton" if fast else "torch",
            huge_pages=False,
            native_decode=False,
        )
    else:
        fast = not cfg.exact and dtype in (torch.bfloat16, torch.float16)
        native = fast and cpu.available()  # builds the extension on first use; False with one warning
        choice = KernelChoice(
            attention="cpu" if fast else "torch",
            norm="torch",
            linear="cpu" if fast else "torch",
            moe="cpu" if native else "torch",
            huge_pages=fast,
            native_decode=native,
        )
    overrides = {}
    if cfg.attention_backend != "auto":
        overrides["attention"] = cfg.attention_backend
    if cfg.moe_backend != "auto":
        overrides["moe"] = cfg.moe_backend
    return KernelChoice(**{**choice.__dict__, **overrides})


def make_forward(model: MixtralForCausalLM, kv_caches: list[KVCache], kernels: KernelChoice,
                 engine: EngineConfig, graphs_allowed: bool) -> StepForward:
    """How the runner runs steps. graphs_allowed: the executor's experts can be captured (local ones; an
    offload store decides on the host at each layer, so it cannot)."""
    if kernels.native_decode:
        return CpuDecodeForward(model, kv_caches)
    capturable = kernels.attention == "triton" and kernels.moe == "triton" and graphs_allowed
    if model.device.type == "cuda" and engine.cuda_graphs and capturable:
        from moe_runtime.engine.cuda_graphs import CudaGraphForward

        cfg = model.config
        max_len = engine.max_model_len or cfg.max_position_embeddings
        block_size = kv_caches[0][0].shape[1]
        max_batch = min(engine.cuda_graph_max_batch, engine.max_num_seqs)
        return CudaGraphForward(model, kv_caches, max_batch, table_width=-(-max_len // block_size))
    if model.device.type == "cuda" and engine.cuda_graphs:
        log.info("CUDA graphs off: they need the triton attention and MoE kernels and local experts")
    return EagerForward(model, kv_caches)
