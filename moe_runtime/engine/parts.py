"""The one place that picks how a model computes on a device: kernels, weight placement, step runner.

Executors call `choose_kernels` once, on CPU `cpu_plan` (which implementation each hot op runs per row
count, measured on this machine and cached: kernels/cpu/dispatch.py), build the model with `model_parts`,
and the runner with `make_forward`. Nothing downstream branches on the device again.

    device  exact   attention  norm    linear  MoE (auto)  steps
    cuda    false   triton     triton  fused   triton      CUDA graphs for decode (engine.cuda_graphs)
    cuda    true    torch      torch   torch   torch       eager
    cpu     false   cpu        torch   cpu     cpu         native decode steps (Mixtral); huge pages
    cpu     true    torch      torch   torch   torch       eager
The CPU fast column applies to 16-bit weights (fp32 weights gain nothing from it: the exact column), and
its native parts to CPUs where the native kernels build (kernels/cpu; else torch's kernels, one warning).
The native decode step implements Mixtral's decoder layer only: families whose layer differs (q/k norms,
biases, shared experts, dense layers; `model.registry.Family.native_decode`) decode eagerly on the same
CPU parts.
`model.attention_backend` and `model.moe_backend` other than `auto` override their column.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_runtime.checkpoint.loader import WeightFormats
from moe_runtime.config import EngineConfig, ModelConfig, ModelLoadConfig
from moe_runtime.engine.cpu_decode import MAX_TOKENS, CpuDecodeForward, plan_decode
from moe_runtime.engine.forward import EagerForward, StepForward
from moe_runtime.engine.prefill_chunk import plan_prefill
from moe_runtime.kernels import cpu
from moe_runtime.kernels.attention import KVCache
from moe_runtime.kernels.cpu import dispatch, plan_cache
from moe_runtime.kernels.cpu.dispatch import CpuPlan
from moe_runtime.model.causal_lm import CausalLM
from moe_runtime.model.experts import ExpertsBuilder
from moe_runtime.model.parts import ModelParts
from moe_runtime.model.registry import family

log = logging.getLogger(__name__)

SIXTEEN_BIT = WeightFormats()  # every weight in the model's dtype


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


# Rows measured at most: beyond this GEMMs are compute bound and the fastest implementation no longer
# changes with the row count (the last bucket's choice runs every larger batch). Keeps start-up to seconds.
MAX_MEASURED_ROWS = 256


def cpu_plan(kernels: KernelChoice, cfg: ModelConfig, dtype: torch.dtype, engine: EngineConfig,
             formats: WeightFormats = SIXTEEN_BIT, sets_tiles: bool = True) -> CpuPlan | None:
    """The measured plans of the CPU fast path for this model's shapes (None without it): read from the plan
    cache, else measured now (a few seconds) and cached. The decode-step plan is added by `make_forward`.
    formats: the experts' and dense projections' weights (`checkpoint.loader.weight_formats`); 8-bit ones
    are measured as stored (int8, fp8). sets_tiles: this plan measures and sets the native GEMM tiles
    for the process (`CpuPlan.dot`, and `dot_int8` / `dot_fp8` for 8-bit weights); a second model in the
    process (a draft) passes False and runs under the first's."""
    if kernels.linear != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return None
    # the 8-bit formats whose native GEMMs run: int8 experts or dense projections, fp8 experts
    eight = {_eight_bit(formats.experts), _eight_bit(formats.dense)} - {"none"}
    path = plan_cache.cache_file(plan_dir(engine), dispatch.machine_key(), _model_key(cfg, dtype, engine, formats))
    plan = plan_cache.load_plan(path)
    if plan is not None:
        if sets_tiles:
            _set_tiles(plan, eight)
        log.info("CPU kernel plan (cached, %s):\n%s", path, plan.describe())
        return plan
    t0 = time.perf_counter()
    native = cpu.available()
    rows = min(engine.max_num_batched_tokens, MAX_MEASURED_ROWS)
    D, H, KVH, Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    # First the native GEMM's tiles (AVX2 or AVX512-BF16) for bf16 weights, and for int8 ones if the model
    # has any (timed on one int8 expert: int8 dense projections come only with int8 experts, `quantized_parts`),
    # set for the process: the native candidates timed next run with them.
    tiles = CpuPlan(dispatch.machine_key())  # the tiles' plans only, for now
    if sets_tiles:
        if dtype == torch.bfloat16 and cpu.has_avx512_bf16():
            inter = cfg.intermediate_size
            eight_bit = {s: dispatch.plan_dot_8bit(s, [(2 * inter, D), (D, inter)], rows) for s in sorted(eight)}
            tiles = CpuPlan(tiles.machine, dot=dispatch.plan_dot_bf16(D, inter, rows),
                            dot_int8=eight_bit.get("int8"), dot_fp8=eight_bit.get("fp8"))
        _set_tiles(tiles, eight)
    dense, head = _eight_bit(formats.dense), "none" if cfg.tie_word_embeddings else _eight_bit(formats.dense)
    shapes = {((H + 2 * KVH) * Dh, D, dense): rows, (D, H * Dh, dense): rows,  # q/k/v stacked, o_proj
              (cfg.vocab_size, D, head): min(engine.max_num_seqs, rows)}  # the head: a row per sampled sequence
    for inter in {cfg.dense_intermediate_size, cfg.shared_expert_intermediate_size} - {None}:
        shapes.update({(2 * inter, D, dense): rows, (D, inter, dense): rows})  # a dense SwiGLU's gate/up, down
    plan = CpuPlan(
        machine=dispatch.machine_key(),
        linear={dispatch.weight_key((n, k), w): dispatch.plan_linear(n, k, dtype, r, native, w)
                for (n, k, w), r in shapes.items()},
        expert=dispatch.plan_expert(D, cfg.intermediate_size, dtype, rows, native, _eight_bit(formats.experts)),
        dot=tiles.dot,
        dot_int8=tiles.dot_int8,
        dot_fp8=tiles.dot_fp8,
    )
    log.info("CPU kernel plan, measured in %.1f s:\n%s", time.perf_counter() - t0, plan.describe())
    plan_cache.save_plan(plan, path)
    return plan


def _set_tiles(plan: CpuPlan, eight_bit: set[str]) -> None:
    """Set the native GEMM tiles' switch points for the process from a plan's `dot`, `dot_int8` and
    `dot_fp8`: bf16 weights' always, an 8-bit format's when the model has weights of it (`eight_bit`: "int8",
    "fp8"; a 16-bit model leaves those switch points as another model in the process set them, e.g. the
    int8 engine beside a 16-bit one in bench/engine_throughput.py)."""
    cpu.dot_bf16_rows(dispatch.dot_min_rows(plan.dot))
    if "int8" in eight_bit:
        cpu.dot_int8_rows(dispatch.dot_min_rows(plan.dot_int8))
    if "fp8" in eight_bit:
        cpu.dot_fp8_rows(dispatch.dot_min_rows(plan.dot_fp8))


def model_parts(kernels: KernelChoice, experts: ExpertsBuilder, plan: CpuPlan | None) -> ModelParts:
    return ModelParts(experts=experts, attention=kernels.attention, norm=kernels.norm, linear=kernels.linear,
                      huge_pages=kernels.huge_pages, cpu_plan=plan)


def plan_dir(engine: EngineConfig) -> Path:
    """Where the measured CPU plans are cached (`engine.cpu_plan_dir`, default in the user's cache)."""
    return Path(engine.cpu_plan_dir) if engine.cpu_plan_dir else Path.home() / ".cache" / "moe-runtime" / "cpu-plans"


def _eight_bit(scheme: str) -> str:
    """The format a weight of `scheme` is measured in: int8 and fp8 weights have native kernels of their own
    costs (kernels/cpu), so each is measured as stored; anything else as 16-bit."""
    return scheme if scheme in ("int8", "fp8") else "none"


def _model_key(cfg: ModelConfig, dtype: torch.dtype, engine: EngineConfig,
               formats: WeightFormats = SIXTEEN_BIT) -> str:
    """What a plan was measured for besides the machine: the shapes, the dtype, the weight formats, the
    most rows."""
    dense = "".join(f" {name}{inter}" for name, inter in (("Idense", cfg.dense_intermediate_size),
                                                           ("Ishared", cfg.shared_expert_intermediate_size)) if inter)
    return (f"D{cfg.hidden_size} I{cfg.intermediate_size} H{cfg.num_attention_heads} KVH{cfg.num_key_value_heads} "
            f"Dh{cfg.head_dim} V{cfg.vocab_size} L{cfg.num_hidden_layers}{dense} {dtype} "
            f"tokens{engine.max_num_batched_tokens} seqs{engine.max_num_seqs}"
            + ("" if formats.experts == "none" else f" experts-{formats.experts}")
            + ("" if formats.dense == "none" else f" dense-{formats.dense}"))


def _formats(model: CausalLM) -> WeightFormats:
    """The loaded model's weight formats: its routed experts' (`model.quantization`, "none" for 16-bit) and
    its attention projections' (`model.quantize_dense`)."""
    blocks = list(model.moe_blocks().values())
    experts = getattr(blocks[0].experts, "scheme", "none") if blocks else "none"
    return WeightFormats(experts, model.layers[0].self_attn.qkv_proj.scheme)


def _native_decode(model: CausalLM, kernels: KernelChoice) -> bool:
    """Whether decode steps run natively (engine/cpu_decode.py): the kernels offer it, the family's decoder
    layer is the one it implements (16-bit or 8-bit attention projections alike)."""
    return kernels.native_decode and family(model.config).native_decode


def complete_plan(model: CausalLM, kv_caches: list[KVCache], kernels: KernelChoice, engine: EngineConfig,
                  plan: CpuPlan | None, prefill_limit: int | None = None) -> CpuPlan | None:
    """`plan` with its parts that are measured on the loaded model, each only where the plan lacks it, and
    saved to the plan cache once if any was measured: the decode step (where decode steps run natively) and,
    given `prefill_limit` (the largest prefill chunk to try: engine/prefill_chunk.py `ladder_limit`; None:
    not wanted), the prefill chunk, measured again when the cached one had another limit. None (off the CPU
    fast path) stays None."""
    if plan is None:
        return None
    parts = {}
    if plan.decode is None and _native_decode(model, kernels):
        t0 = time.perf_counter()
        parts["decode"] = plan_decode(model, kv_caches, min(engine.max_num_seqs, MAX_TOKENS))
        log.info("CPU decode-step plan, measured in %.1f s: %s", time.perf_counter() - t0,
                 ", ".join(dispatch.ranges(parts["decode"])))
    if prefill_limit is not None and (plan.prefill is None or plan.prefill.limit != prefill_limit):
        parts["prefill"] = plan_prefill(model, kv_caches, prefill_limit)  # logs its figures
    if not parts:
        return plan
    plan = dataclasses.replace(plan, **parts)
    key = _model_key(model.config, model.dtype, engine, _formats(model))
    plan_cache.save_plan(plan, plan_cache.cache_file(plan_dir(engine), plan.machine, key))
    return plan


def make_forward(model: CausalLM, kv_caches: list[KVCache], kernels: KernelChoice,
                 engine: EngineConfig, graphs_allowed: bool, plan: CpuPlan | None = None) -> StepForward:
    """How the runner runs steps. graphs_allowed: the executor's experts can be captured (local ones; an
    offload store decides on the host at each layer, so it cannot). plan: the CPU plan, whose decode-step
    part (native calls or eager ops, per batch size) is measured here on the loaded model if it has none.
    The native decode step runs only families whose decoder layer it implements (`Family.native_decode`)."""
    if _native_decode(model, kernels):
        plan = complete_plan(model, kv_caches, kernels, engine, plan)  # its decode-step part, if it lacks it
        return CpuDecodeForward(model, kv_caches, None if plan is None else plan.decode)
    # 16-bit and 8-bit (int8 / fp8: the w8a16 kernels) experts alike: static grids, no host sync
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
