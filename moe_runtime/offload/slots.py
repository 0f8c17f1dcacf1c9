"""One layer's resident experts: S device slots, and the maps between expert ids and slots.

Invariant: `slot_of[e] == s` if and only if `expert_in[s] == e`; -1 on either side means "none". The
device `slot_map` [E] int32 that `fused_moe` consumes is rebuilt from `slot_of` only when it changed.
A slot may have a pending asynchronous copy (`pending[s]`, a mover handle): its bytes are not there yet,
and anyone who reads or overwrites the slot waits for the handle first.
"""

from __future__ import annotations

import torch

from moe_runtime.kernels.quant import new_weight
from moe_runtime.offload.policy import EvictionPolicy

# S slots, E experts, I intermediate, D hidden


class LayerSlots:
    def __init__(self, num_experts: int, num_slots: int, shapes: tuple[int, int], dtype: torch.dtype,
                 device: torch.device, policy: EvictionPolicy, scheme: str = "none"):
        D, I = shapes  # noqa: E741
        self.device = device
        # [S, 2I, D] and [S, D, I]: 16-bit tensors, or QuantizedWeights (8-bit values + fp32 row scales)
        self.w13 = new_weight((num_slots, 2 * I, D), dtype, scheme, device=device, zeros=True)
        self.w2 = new_weight((num_slots, D, I), dtype, scheme, device=device, zeros=True)
        self.slot_of = [-1] * num_experts  # [E] host ints
        self.expert_in = [-1] * num_slots  # [S] host ints
        self.pending: list[object | None] = [None] * num_slots  # [S] mover handles
        self.policy = policy
        self._slot_map = torch.full((num_experts,), -1, dtype=torch.int32, device=device)  # [E]
        self._stale = False

    @property
    def num_slots(self) -> int:
        return len(self.expert_in)

    def resident(self) -> list[int]:
        """Resident expert ids, ascending."""
        return sorted(e for e in self.expert_in if e >= 0)

    def place(self, expert: int, slot: int) -> None:
        """Record that `slot` now holds `expert` (whatever it held before is gone)."""
        old = self.expert_in[slot]
        if old >= 0:
            self.slot_of[old] = -1
        self.expert_in[slot] = expert
        self.slot_of[expert] = slot
        self._stale = True

    def slot_map(self) -> torch.Tensor:
        """[E] int32 on the device: expert id -> slot, -1 when not resident."""
        if self._stale:
            self._slot_map = torch.tensor(self.slot_of, dtype=torch.int32).to(self.device, non_blocking=True)
            self._stale = False
        return self._slot_map

    def partial_map(self, experts: list[int]) -> torch.Tensor:
        """[E] int32 on the device mapping only `experts` (all resident) to their slots; others -1."""
        m = [-1] * len(self.slot_of)
        for e in experts:
            m[e] = self.slot_of[e]
        return torch.tensor(m, dtype=torch.int32).to(self.device, non_blocking=True)
