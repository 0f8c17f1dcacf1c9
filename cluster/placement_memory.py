"""Weight memory of a placement: bytes each rank holds, checked against `placement.memory_per_rank`.

Every rank holds the shared weights (embeddings, attention, norms, routers, shared experts, dense layers'
MLPs, lm_head) plus one routed expert's weights per copy it holds in a sparse layer (a placement also lists
experts for dense layers, which have none: they cost nothing); both byte counts come from
`moe_runtime.checkpoint.layout`, their one home. With quantized experts (`quantization`: int8, fp8) an expert
copy counts its 8-bit values and fp32 row scales; the shared weights count in `dtype` (with
`model.quantize_dense` they take less: the check errs on the safe side).
"""

from __future__ import annotations

from moe_runtime.checkpoint.layout import expert_bytes, shared_bytes
from moe_runtime.cluster.placement import Placement
from moe_runtime.config import ModelConfig
from moe_runtime.errors import ConfigError


def rank_bytes(placement: Placement, model: ModelConfig, dtype: str = "auto", quantization: str = "none") -> list[int]:
    """Weight bytes each rank holds under `placement`: shared weights plus its expert copies. Returns [N]."""
    copies = placement.experts_per_rank()[list(model.moe_layers)].sum(dim=0).tolist()  # [N] over sparse layers
    shared, expert = shared_bytes(model, dtype), expert_bytes(model, dtype, quantization)
    return [shared + c * expert for c in copies]


def check_memory(
    placement: Placement,
    model: ModelConfig,
    budget: int | None,
    dtype: str = "auto",
    where: str = "placement",
    quantization: str = "none",
) -> None:
    """Raise `ConfigError` when a rank's weights exceed `budget` bytes (`placement.memory_per_rank`)."""
    if budget is None:
        return
    shared, expert = shared_bytes(model, dtype), expert_bytes(model, dtype, quantization)
    for rank, used in enumerate(rank_bytes(placement, model, dtype, quantization)):
        if used > budget:
            q = "" if quantization == "none" else f" in {quantization}"
            raise ConfigError(
                f"{where}.memory_per_rank={budget} ({budget / 2**30:.1f} GiB): rank {rank} needs {used} "
                f"bytes ({used / 2**30:.1f} GiB: {(used - shared) // expert} expert copies of {expert} bytes{q} "
                f"plus {shared} shared); raise the budget, add workers or move experts off rank {rank}"
            )
