"""The expert store: per layer a few resident experts on the device, the rest in a host tier.

Each MoE layer's `OffloadedExperts` calls `ExpertStore.run(layer, x, routing, backend)` instead of
`fused_moe` on all experts.
Per call (one layer of one step):
  1. Count the tokens routed to each expert (the one host sync: the store must know what to load).
  2. Score the previous layer's guess for this layer (prefetch accuracy).
  3. Split the needed experts into hits (resident) and misses; each miss is fetched into a slot or, by the
     miss policy (`auto`: the calibrated `CostModel`), computed on the host.
  4. Prefetch: apply the next layer's gate to this layer's input and start copying the experts it picks
     into the next layer's slots (side CUDA stream / worker thread), so they travel while this layer
     computes.
  5. Compute. Usually every needed expert fits in the S slots: misses are fetched, evicting by policy
     only experts this step does not need, and one `fused_moe` call runs them with the layer's slot map.
     Otherwise (more than S experts needed, or some on the host) experts run in parts: waves of at most S
     slots, never evicting an expert of the current wave, plus the host ones. Each part is
     `fused_moe_fp32` (the backend's own arithmetic, before its final rounding) over its experts; parts are
     summed in fp32 and rounded once. With top-2 routing a token's output is p0 + p1 in fp32 either way
     (adding 0 is exact), so outputs are bit-identical to the all-resident run in every dtype. With top-k > 2
     (Qwen-MoE, OLMoE) parts add a token's pairs in another association than the one-call kernel: fp32
     outputs of such steps may differ in the last bits, 16-bit ones after their one rounding almost never
     (tests/offload/test_offload_families.py). TODO(kernels): exact for any k once the backends can return
     per-pair rows ([T, k, D] fp32) to sum in k order here.
Only routed experts live here: dense layers have no slots, and a shared expert (Qwen2-MoE) is an ordinary
weight of its layer, always resident.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from moe_runtime.checkpoint.layout import expert_bytes
from moe_runtime.config import ModelConfig, OffloadConfig
from moe_runtime.kernels import RoutingResult, fused_moe, fused_moe_fp32
from moe_runtime.kernels.quant import weight_bytes
from moe_runtime.offload.cost_model import CostModel
from moe_runtime.offload.host_tier import HostTier
from moe_runtime.offload.policy import POLICIES
from moe_runtime.offload.slots import LayerSlots
from moe_runtime.offload.stats import OffloadStats
from moe_runtime.offload.transfer import make_mover

# T tokens, E experts, A activated (top-k), S resident slots per layer, D hidden, I intermediate


class ExpertStore:
    """Owns where each routed expert's weights are, and runs a layer's experts from wherever they are.

    gates: the router linear of each sparse layer, by decoder layer index (the store applies the next sparse
    layer's gate to this one's input for prefetch; dense layers have no experts and no slots).
    cost: the miss cost model; None calibrates one when `offload.miss == "auto"`.
    """

    def __init__(self, cfg: ModelConfig, offload: OffloadConfig, tier: HostTier, gates: dict[int, nn.Linear],
                 device: torch.device, dtype: torch.dtype, cost: CostModel | None = None, scheme: str = "none"):
        self.cfg, self.offload, self.tier, self.gates = cfg, offload, tier, gates
        self.device = torch.device(device)
        # a byte budget buys experts at their stored size: twice as many int8 experts as bf16 ones
        self.num_slots = offload.resolve_slots(cfg, expert_bytes(cfg, dtype, scheme))
        E, S = cfg.num_local_experts, self.num_slots
        # sparse layer -> its slots, and -> the next sparse layer (prefetch target)
        self.layers = {
            l: LayerSlots(E, S, (cfg.hidden_size, cfg.intermediate_size), dtype, self.device, POLICIES[offload.policy](),
                          scheme)
            for l in cfg.moe_layers
        }
        self._next = dict(zip(cfg.moe_layers[:-1], cfg.moe_layers[1:], strict=True))
        for layer, slots in self.layers.items():  # start full: experts 0..S-1 (not counted in stats)
            for e in range(S):
                tier.copy_into(layer, e, slots.w13[e], slots.w2[e])
                slots.place(e, e)
        self.mover = make_mover(self.device, self._expert_bytes(self.layers[cfg.moe_layers[0]]))
        if cost is None and offload.miss == "auto":
            cost = CostModel.calibrate(cfg, tier, self.device, dtype, scheme)
        self.cost = cost
        # per sparse layer: the previous one's (guess, guessed experts it loaded), scored when the layer runs
        self._guesses: dict[int, tuple[list[int], list[int]] | None] = dict.fromkeys(cfg.moe_layers)
        self._stats = OffloadStats()

    # -----------------------------------------------------------------------------------------------------
    # The hot path
    # -----------------------------------------------------------------------------------------------------
    def run(self, layer: int, x: torch.Tensor, routing: RoutingResult, backend: str) -> torch.Tensor:
        """The MoE experts of one layer. x: [T, D]; routing ids [T, A]. Returns [T, D] in x's dtype."""
        slots, st = self.layers[layer], self._stats
        counts = torch.bincount(routing.ids.flatten(), minlength=len(slots.slot_of)).tolist()  # [E] host sync
        needed = [e for e, c in enumerate(counts) if c]
        self._score_guess(layer, needed)
        for e in needed:
            slots.policy.record_use(e)
        hits = [e for e in needed if slots.slot_of[e] >= 0]
        misses = [e for e in needed if slots.slot_of[e] < 0]
        st.hits += len(hits)
        st.misses += len(misses)
        on_host = self._host_misses(misses, counts)
        to_fetch = [e for e in misses if e not in on_host]
        if self.offload.prefetch and layer in self._next:
            self._prefetch(self._next[layer], x)
        if not on_host and len(needed) <= slots.num_slots:  # the usual case: one call of the fused kernel
            self._make_resident(layer, hits, to_fetch)
            return fused_moe(x, slots.w13, slots.w2, routing, slot_map=slots.slot_map(), backend=backend)
        acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, D] fp32 partial sums
        self._run_waves(layer, x, routing, acc, hits, to_fetch, backend)
        if on_host:
            self._run_on_host(layer, x, routing, acc, on_host, backend)
        return acc.to(x.dtype)  # [T, D], rounded once as fused_moe does

    def _make_resident(self, layer: int, hits: list[int], to_fetch: list[int]) -> None:
        """Fetch `to_fetch` into slots not holding `hits`, then wait until every one of them has landed."""
        slots = self.layers[layer]
        keep = set(hits)
        for e in to_fetch:
            self._fetch(layer, e, self._free_slot(slots, keep))
            keep.add(e)
        self._wait_ready(slots, hits)

    def _run_waves(self, layer: int, x: torch.Tensor, routing: RoutingResult, acc: torch.Tensor,
                   hits: list[int], to_fetch: list[int], backend: str) -> None:
        """Device experts in waves of at most S (the resident ones first), each adding its fp32 part to acc."""
        slots = self.layers[layer]
        wave, todo = list(hits), list(to_fetch)
        while wave or todo:
            free = slots.num_slots - len(wave)
            self._make_resident(layer, wave, todo[:free])  # evicts only experts outside this wave
            wave, todo = wave + todo[:free], todo[free:]
            acc += fused_moe_fp32(x, slots.w13, slots.w2, routing, slot_map=slots.partial_map(wave), backend=backend)
            wave = []

    def _run_on_host(self, layer: int, x: torch.Tensor, routing: RoutingResult, acc: torch.Tensor,
                     experts: list[int], backend: str) -> None:
        """Compute `experts` on the host: tokens go to the CPU, their fp32 part comes back into acc."""
        st = self._stats
        st.host_computed += len(experts)
        t0 = time.perf_counter()
        w13, w2, slot_map = self.tier.host_weights(layer, experts)  # [n, 2I, D], [n, D, I], [E]
        if self.tier.reads_storage:
            st.stall_s += time.perf_counter() - t0
            st.bytes_moved += len(experts) * self._expert_bytes(self.layers[layer])
        host_backend = backend if backend in ("torch", "reference", "cpu") else "auto"  # a CPU backend
        routing_cpu = RoutingResult(routing.weights.cpu(), routing.ids.cpu())
        y = fused_moe_fp32(x.cpu(), w13, w2, routing_cpu, slot_map=slot_map, backend=host_backend)  # [T, D]
        acc += y.to(acc.device)

    # -----------------------------------------------------------------------------------------------------
    # Misses, eviction, prefetch
    # -----------------------------------------------------------------------------------------------------
    def _host_misses(self, misses: list[int], counts: list[int]) -> list[int]:
        if self.offload.miss == "fetch":
            return []
        if self.offload.miss == "host_compute":
            return list(misses)
        return [e for e in misses if self.cost.prefer_host(counts[e])]

    def _free_slot(self, slots: LayerSlots, keep: set[int]) -> int:
        """A slot to overwrite: an empty one, else the policy's victim among experts not in `keep`."""
        if -1 in slots.expert_in:
            slot = slots.expert_in.index(-1)
        else:
            victim = slots.policy.victim([e for e in slots.expert_in if e not in keep])
            slot = slots.slot_of[victim]
            self._stats.evictions += 1
        if slots.pending[slot] is not None:  # an in-flight prefetch into it must land before we overwrite
            self._wait(slots, slot)
        return slot

    def _fetch(self, layer: int, expert: int, slot: int) -> None:
        slots = self.layers[layer]
        t0 = time.perf_counter()
        self._stats.bytes_moved += self.tier.copy_into(layer, expert, slots.w13[slot], slots.w2[slot])
        self._stats.stall_s += time.perf_counter() - t0
        self._stats.fetched += 1
        slots.place(expert, slot)

    def _prefetch(self, layer: int, x: torch.Tensor) -> None:
        """Guess `layer`'s experts from its gate on x [T, D] and start loading those not resident."""
        slots, st = self.layers[layer], self._stats
        guess = self._guess(layer, x)
        st.prefetch_guessed += len(guess)
        keep, loaded = set(guess), []
        for e in guess:  # at most S guesses, so a slot outside `keep` always exists
            if slots.slot_of[e] >= 0:
                continue
            slot = self._free_slot(slots, keep)
            w13, w2 = slots.w13[slot], slots.w2[slot]
            slots.pending[slot] = self.mover.submit(lambda e=e, w13=w13, w2=w2: self.tier.copy_into(layer, e, w13, w2))
            slots.place(e, slot)
            loaded.append(e)
            st.prefetch_loaded += 1
            st.bytes_moved += self._expert_bytes(slots)
        self._guesses[layer] = (guess, loaded)

    def _guess(self, layer: int, x: torch.Tensor) -> list[int]:
        """The experts layer `layer`'s gate picks most often for x [T, D], at most min(prefetch_experts, S)."""
        A = self.cfg.num_experts_per_tok
        n = min(self.offload.prefetch_experts or A, self.num_slots)
        ids = torch.topk(self.gates[layer](x), A, dim=-1).indices  # [T, A] (softmax keeps the order)
        if x.shape[0] == 1:  # decode of one sequence: its top-A, best first
            return ids[0].tolist()[:n]
        counts = torch.bincount(ids.flatten(), minlength=self.cfg.num_local_experts).tolist()  # [E]
        ranked = sorted((e for e, c in enumerate(counts) if c), key=lambda e: -counts[e])
        return ranked[:n]

    def _score_guess(self, layer: int, needed: list[int]) -> None:
        guess, self._guesses[layer] = self._guesses[layer], None
        if guess is not None:
            self._stats.prefetch_used += len(set(guess[0]).intersection(needed))
            self._stats.prefetch_useful += len(set(guess[1]).intersection(needed))

    def _wait_ready(self, slots: LayerSlots, experts: list[int]) -> None:
        for e in experts:
            if slots.pending[slots.slot_of[e]] is not None:
                self._wait(slots, slots.slot_of[e])

    def _wait(self, slots: LayerSlots, slot: int) -> None:
        t0 = time.perf_counter()
        self.mover.wait(slots.pending[slot])
        slots.pending[slot] = None
        self._stats.stall_s += time.perf_counter() - t0

    @staticmethod
    def _expert_bytes(slots: LayerSlots) -> int:
        return weight_bytes(slots.w13[0]) + weight_bytes(slots.w2[0])

    # -----------------------------------------------------------------------------------------------------
    # Inspection
    # -----------------------------------------------------------------------------------------------------
    def stats(self) -> OffloadStats:
        """A snapshot of the cumulative counters (a copy: safe to keep)."""
        return self._stats.copy()

    def reset_stats(self) -> None:
        self._stats = OffloadStats()

    def resident(self, layer: int) -> list[int]:
        return self.layers[layer].resident()

    def device_bytes(self) -> int:
        """Bytes of all layers' slot buffers on the device."""
        return sum(weight_bytes(s.w13) + weight_bytes(s.w2) for s in self.layers.values())

    def close(self) -> None:
        self.mover.close()
        self.tier.close()
