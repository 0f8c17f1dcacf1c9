"""Host tiers: where an expert lives when it has no device slot, and how it gets to one.

`PinnedTier` holds every expert in CPU memory (page-locked when CUDA is there, so copies are async DMA).
`MmapTier` holds nothing: it reads an expert from the checkpoint's safetensors files when asked, so a
CPU-only host keeps only the device slots in memory. Both can also run experts on the host (the
`host_compute` miss policy) so that cold experts need not be copied at all.

With quantized experts (`model.quantization`) both tiers hand out 8-bit experts with their scales
(`kernels.quant.QuantizedWeight`): `PinnedTier` holds them quantized (half the host memory of bf16),
`MmapTier` reads them from a spill file that holds every expert quantized once (offload/spill.py; without
one, where it cannot be written, it quantizes each expert as it reads the 16-bit checkpoint). Bytes moved
are the quantized bytes.
"""

from __future__ import annotations

from typing import Protocol

import torch

from moe_runtime.checkpoint.layout import layout_of
from moe_runtime.checkpoint.reader import SafetensorsReader
from moe_runtime.config import ModelConfig
from moe_runtime.kernels.quant import new_weight, weight_bytes
from moe_runtime.offload.spill import open_spill

# E experts, I intermediate, D hidden, T tokens, n experts asked for


class HostTier(Protocol):
    reads_storage: bool  # True when serving an expert reads it from disk (host compute pays that too)

    def copy_into(self, layer: int, expert: int, w13: torch.Tensor, w2: torch.Tensor) -> int: ...

    def host_weights(self, layer: int, experts: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def close(self) -> None: ...


class PinnedTier:
    """Every expert of every sparse layer stacked in CPU memory: w13[l] [E, 2I, D], w2[l] [E, D, I]."""

    reads_storage = False

    def __init__(self, reader: SafetensorsReader, cfg: ModelConfig, dtype: torch.dtype, pin: bool,
                 scheme: str = "none"):
        E, I, D = cfg.num_local_experts, cfg.intermediate_size, cfg.hidden_size  # noqa: E741
        self.w13 = {l: new_weight((E, 2 * I, D), dtype, scheme, pin_memory=pin) for l in cfg.moe_layers}
        self.w2 = {l: new_weight((E, D, I), dtype, scheme, pin_memory=pin) for l in cfg.moe_layers}
        layout = layout_of(cfg)
        for layer in cfg.moe_layers:
            for e in range(E):
                layout.read_expert(reader.read_weight, layer, e, self.w13[layer][e], self.w2[layer][e])

    def copy_into(self, layer: int, expert: int, w13: torch.Tensor, w2: torch.Tensor) -> int:
        """Copy one expert into a device slot (w13 [2I, D], w2 [D, I]); async from pinned memory on CUDA."""
        w13.copy_(self.w13[layer][expert], non_blocking=True)
        w2.copy_(self.w2[layer][expert], non_blocking=True)
        return weight_bytes(w13) + weight_bytes(w2)

    def host_weights(self, layer: int, experts: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w13 [E, 2I, D], w2 [E, D, I], slot_map [E]) in CPU memory for `fused_moe` on the host: the whole
        layer (no copy), with only `experts` mapped (e -> e; the others -1)."""
        slot_map = torch.full((self.w13[layer].shape[0],), -1, dtype=torch.int32)  # [E]
        slot_map[experts] = torch.tensor(experts, dtype=torch.int32)
        return self.w13[layer], self.w2[layer], slot_map

    def close(self) -> None:
        self.w13.clear()
        self.w2.clear()


class MmapTier:
    """Experts stay in storage; each request reads them (through the page cache): from the checkpoint files,
    or, for 8-bit experts of a 16-bit checkpoint, from the quantized spill file (`spill_dir`: where it lives,
    None: offload/spill.py's default)."""

    reads_storage = True

    def __init__(self, reader: SafetensorsReader, cfg: ModelConfig, dtype: torch.dtype, scheme: str = "none",
                 spill_dir: str | None = None):
        self.reader, self.dtype, self.layout, self.scheme = reader, dtype, layout_of(cfg), scheme
        self.E, self.I, self.D = cfg.num_local_experts, cfg.intermediate_size, cfg.hidden_size
        first = self.layout.expert_names(cfg.moe_layers[0], 0).gate
        sixteen_bit = reader.locations[first].dtype.itemsize > 1  # an FP8 checkpoint's experts are read as they are
        self.spill = open_spill(reader, cfg, scheme, spill_dir) if scheme != "none" and sixteen_bit else None

    def _read(self, layer: int, expert: int, w13: torch.Tensor, w2: torch.Tensor) -> int:
        if self.spill is not None:
            return self.spill.read_expert(layer, expert, w13, w2)
        return sum(self.layout.read_expert(self.reader.read_weight, layer, expert, w13, w2))  # bytes read

    def copy_into(self, layer: int, expert: int, w13: torch.Tensor, w2: torch.Tensor) -> int:
        """Read one expert into a slot (w13 [2I, D], w2 [D, I]); through a CPU bounce buffer for CUDA slots."""
        if w13.device.type == "cpu":
            self._read(layer, expert, w13, w2)
        else:
            h13, h2 = (new_weight(tuple(w.shape), self.dtype, self.scheme) for w in (w13, w2))
            self._read(layer, expert, h13, h2)
            w13.copy_(h13)
            w2.copy_(h2)
        return weight_bytes(w13) + weight_bytes(w2)

    def host_weights(self, layer: int, experts: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w13 [n, 2I, D], w2 [n, D, I], slot_map [E]): `experts` read into fresh CPU buffers, expert
        experts[i] -> i in the map, for `fused_moe` on the host."""
        w13 = new_weight((len(experts), 2 * self.I, self.D), self.dtype, self.scheme)  # [n, 2I, D]
        w2 = new_weight((len(experts), self.D, self.I), self.dtype, self.scheme)  # [n, D, I]
        slot_map = torch.full((self.E,), -1, dtype=torch.int32)  # [E]
        for i, e in enumerate(experts):
            self._read(layer, e, w13[i], w2[i])
            slot_map[e] = i
        return w13, w2, slot_map

    def close(self) -> None:
        self.reader.close()
        if self.spill is not None:
            self.spill.close()
