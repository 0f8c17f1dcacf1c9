"""Expert-parallel MoE on one rank: compute the (token, expert) pairs the placement gives this rank, then sum
every rank's partial output. The building block of the Ray executor's workers; no Ray import.

Every rank runs the whole step on the same flat batch (attention and routers are replicated), so every rank
sees the same x [T, D] and routing. Per MoE layer:
  1. `Placement.local_slots(rank, layer, ids)`: the slot of each (token, k) pair this rank computes, -1 for
     pairs computed elsewhere (a replicated expert's pairs are split by token index).
  2. One `fused_moe_fp32` call, with the model's backend, over the local slots: the routing's ids become
     local slot ids, and pairs computed elsewhere go to one extra id whose `slot_map` entry is -1
     (contributes zero). The output [T, D] is this rank's share, in fp32, not rounded yet.
  3. all_reduce(SUM) of the fp32 shares over the group, then one rounding to x's dtype.
Each pair is computed on exactly one rank and the others add exact zeros, so for top-2 routing (Mixtral)
each token's sum is the local run's single fp32 addition (a + b == b + a) and the rounded result has the
local run's bits in every dtype, unless an expert is replicated: its GEMM then runs on fewer rows and may
be blocked differently (or cross the torch backend's 16-bit upcast threshold), within the dtype's tolerance.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_runtime.cluster.placement import Placement
from moe_runtime.config import ModelConfig
from moe_runtime.kernels import RoutingResult, fused_moe_fp32
from moe_runtime.model.loader import CheckpointFiles
from moe_runtime.offload.host_tier import expert_names
from moe_runtime.offload.safetensors_reader import SafetensorsReader

# T tokens, A activated (top-k), D hidden, I intermediate, S_r expert slots on this rank


class ShardedExperts:
    """One MoE layer's experts on one rank; plugs into `SparseMoeBlock.experts` (`run(x, routing, backend)`).

    w13: [S_r, 2I, D] and w2: [S_r, D, I], the local experts in slot order (`placement.local_experts`).
    group: the expert-parallel process group; None runs alone (the share is the output: tests, one rank).
    """

    def __init__(
        self,
        placement: Placement,
        rank: int,
        layer: int,
        w13: torch.Tensor,
        w2: torch.Tensor,
        group: dist.ProcessGroup | None = None,
    ):
        num_local = len(placement.local_experts(rank, layer))
        if w13.shape[0] != num_local or w2.shape[0] != num_local:
            raise ValueError(
                f"rank {rank} layer {layer}: placement gives {num_local} experts, weights hold "
                f"w13 {list(w13.shape)}, w2 {list(w2.shape)}"
            )
        self.placement, self.rank, self.layer, self.group = placement, rank, layer, group
        self.w13, self.w2 = w13, w2
        # slot s -> slot s, plus the extra id num_local for "computed elsewhere" -> -1
        self.slot_map = torch.cat([torch.arange(num_local), torch.tensor([-1])]).to(w13.device)  # [S_r + 1]

    def share(self, x: torch.Tensor, routing: RoutingResult, backend: str) -> torch.Tensor:
        """This rank's part of the layer output, before the sum over ranks. x: [T, D]. Returns fp32 [T, D].

        Example: with expert 1 on ranks (0, 1), rank 1 computes its pairs of odd tokens only:
            >>> p = Placement(2, (((0,), (0, 1)),))
            >>> p.local_slots(1, 0, torch.tensor([[1, 0], [0, 1], [1, 0]])).tolist()
            [[-1, -1], [-1, 0], [-1, -1]]
        """
        slots = self.placement.local_slots(self.rank, self.layer, routing.ids)  # [T, A], -1 = elsewhere
        num_local = self.w13.shape[0]
        ids = torch.where(slots >= 0, slots, num_local).to(routing.ids.dtype)  # [T, A] in [0, S_r]
        local = RoutingResult(weights=routing.weights, ids=ids)
        return fused_moe_fp32(x, self.w13, self.w2, local, slot_map=self.slot_map, backend=backend)  # [T, D]

    def run(self, x: torch.Tensor, routing: RoutingResult, backend: str) -> torch.Tensor:
        """The layer's MoE output, summed over the group in fp32. x: [T, D]. Returns [T, D] in x's dtype."""
        out = self.share(x, routing, backend)  # [T, D] fp32
        if self.group is not None:
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out.to(x.dtype)  # one rounding, as the local kernels do


def shard_experts(model, placement: Placement, rank: int, group: dist.ProcessGroup | None = None) -> None:
    """Keep only `rank`'s experts in a loaded `MixtralForCausalLM` (all E experts in w13/w2) and attach a
    `ShardedExperts` to every MoE block. The blocks' w13/w2 then hold the S_r local experts only.
    """
    if placement.num_layers != len(model.layers) or placement.num_experts != model.config.num_local_experts:
        raise ValueError(
            f"placement is {placement.num_layers} layers x {placement.num_experts} experts, "
            f"model {len(model.layers)} x {model.config.num_local_experts}"
        )
    for layer, block in enumerate(model.layers):
        moe = block.block_sparse_moe
        local = torch.tensor(placement.local_experts(rank, layer), dtype=torch.long, device=moe.w13.device)
        moe.w13 = torch.nn.Parameter(moe.w13[local].clone(), requires_grad=False)  # [S_r, 2I, D]
        moe.w2 = torch.nn.Parameter(moe.w2[local].clone(), requires_grad=False)  # [S_r, D, I]
        moe.experts = ShardedExperts(placement, rank, layer, moe.w13, moe.w2, group)


def place_experts(
    model, placement: Placement, rank: int, model_dir: str, group: dist.ProcessGroup | None,
    have: Placement | None = None,
) -> None:
    """Make every MoE block of `model` hold `rank`'s experts under `placement` and attach `ShardedExperts`.

    Experts that `have` (the placement the blocks follow now; None: they hold nothing yet, as after
    `load_model(..., experts=False)`) already gives this rank are kept; the others are read from the
    checkpoint, one expert at a time (pread: no whole-checkpoint mmap pages stay resident).
    """
    inter = model.config.intermediate_size
    with ExpertReader(model_dir, model.config) as reader:
        for layer, block in enumerate(model.layers):
            moe = block.block_sparse_moe
            held = {} if have is None else {e: s for s, e in enumerate(have.local_experts(rank, layer))}
            want = placement.local_experts(rank, layer)
            w13 = torch.empty(len(want), *moe.w13.shape[1:], dtype=moe.w13.dtype, device=moe.w13.device)
            w2 = torch.empty(len(want), *moe.w2.shape[1:], dtype=moe.w2.dtype, device=moe.w2.device)
            for slot, e in enumerate(want):
                if e in held:
                    w13[slot], w2[slot] = moe.w13[held[e]], moe.w2[held[e]]
                else:
                    reader.read(layer, e, w13[slot], w2[slot], inter)
            moe.w13 = torch.nn.Parameter(w13, requires_grad=False)  # [S_r, 2I, D]
            moe.w2 = torch.nn.Parameter(w2, requires_grad=False)  # [S_r, D, I]
            moe.experts = ShardedExperts(placement, rank, layer, w13, w2, group)


class ExpertReader:
    """Reads single experts from a checkpoint's safetensors files (for experts a rank gains on re-placement).

    Use as a context manager: `read(layer, expert, w13 [2I, D], w2 [D, I], I)` fills the two tensors.
    """

    def __init__(self, model_dir: str, cfg: ModelConfig):
        with CheckpointFiles(model_dir, cfg) as ckpt:
            location = {n: f for n, f in ckpt.location.items() if ".block_sparse_moe.experts." in n}
        self.reader = SafetensorsReader(model_dir, location)

    def read(self, layer: int, expert: int, w13: torch.Tensor, w2: torch.Tensor, inter: int) -> None:
        w1_name, w3_name, w2_name = expert_names(layer, expert)
        host13 = torch.empty(w13.shape, dtype=w13.dtype)  # [2I, D] on the host, then one copy
        host2 = torch.empty(w2.shape, dtype=w2.dtype)  # [D, I]
        self.reader.read_into(w1_name, host13[:inter])  # gate rows
        self.reader.read_into(w3_name, host13[inter:])  # up rows
        self.reader.read_into(w2_name, host2)
        w13.copy_(host13)
        w2.copy_(host2)

    def __enter__(self) -> ExpertReader:
        return self

    def __exit__(self, *exc) -> None:
        self.reader.close()
