"""The table of MoE shapes and routings every kernel test runs, and the inputs they are built from.

Awkward on purpose: T in {1, 3, 9, 17, 33}, H and I not multiples of the test tiles (32), an expert with no
tokens, all tokens on one expert, and a slot map that drops experts (-1) with fewer slots than experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_runtime.kernels.reference import RoutingResult, route_reference
from moe_runtime.kernels.tile_config import TileConfig


@dataclass(frozen=True)
class MoeCase:
    name: str
    T: int  # tokens
    H: int  # hidden
    I: int  # intermediate  # noqa: E741
    E: int  # experts
    k: int  # top-k
    routing: str = "random"  # random | empty_expert | one_expert
    slot_map: tuple[int, ...] | None = None  # expert -> slot, -1 = not resident


CASES = (
    MoeCase("t1_e4_k1", T=1, H=64, I=48, E=4, k=1),
    MoeCase("t3_e8_k2_ragged", T=3, H=40, I=72, E=8, k=2),
    MoeCase("t33_e8_k2_ragged", T=33, H=96, I=80, E=8, k=2),
    MoeCase("t33_e4_k2_empty_expert", T=33, H=40, I=48, E=4, k=2, routing="empty_expert"),
    MoeCase("t17_e8_k1_one_expert", T=17, H=64, I=40, E=8, k=1, routing="one_expert"),
    MoeCase("t9_e8_k2_slot_map", T=9, H=48, I=64, E=8, k=2, slot_map=(0, -1, 1, 2, -1, 3, -1, 4)),
)

# Small tiles so that the shapes above exercise every mask (K tail, N tail, padded rows).
TEST_TILES = TileConfig(block_m=16, block_n=32, block_k=32, group_m=2, num_warps=4, num_stages=2)


@dataclass(frozen=True)
class MoeInputs:
    hidden: torch.Tensor  # [T, H]
    w13: torch.Tensor  # [S, 2I, H]
    w2: torch.Tensor  # [S, H, I]
    routing: RoutingResult  # ids [T, k] in [0, E)
    slot_map: torch.Tensor | None  # [E] or None
    slot_ids: torch.Tensor  # [T, k] slot of each pair, -1 = dropped


def router_logits(case: MoeCase, generator: torch.Generator) -> torch.Tensor:
    """[T, E] fp32 logits shaped so that the case's routing happens."""
    logits = torch.randn(case.T, case.E, generator=generator)
    if case.routing == "empty_expert":
        logits[:, 1] = -1e4  # expert 1 never chosen
    elif case.routing == "one_expert":
        logits[:, 3] = 1e4  # every token's first choice
    return logits


def make_inputs(case: MoeCase, dtype: torch.dtype, device: str = "cpu", seed: int = 7) -> MoeInputs:
    """Seeded inputs, randn / 10 (the scale of the house kernel tests)."""
    g = torch.Generator().manual_seed(seed)
    S = case.E if case.slot_map is None else max(case.slot_map) + 1
    hidden = torch.randn(case.T, case.H, generator=g) / 10
    w13 = torch.randn(S, 2 * case.I, case.H, generator=g) / 10
    w2 = torch.randn(S, case.H, case.I, generator=g) / 10
    routing = route_reference(router_logits(case, g), case.k)
    slot_map = None if case.slot_map is None else torch.tensor(case.slot_map, dtype=torch.int32)
    slot_ids = routing.ids if slot_map is None else slot_map[routing.ids.long()]
    dev = torch.device(device)
    return MoeInputs(
        hidden=hidden.to(dev, dtype),
        w13=w13.to(dev, dtype),
        w2=w2.to(dev, dtype),
        routing=RoutingResult(weights=routing.weights.to(dev), ids=routing.ids.to(dev)),
        slot_map=None if slot_map is None else slot_map.to(dev),
        slot_ids=slot_ids.to(dev),
    )


def num_slots(inputs: MoeInputs) -> int:
    return inputs.w13.shape[0]
