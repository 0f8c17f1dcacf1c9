"""When is computing a missing expert on the host cheaper than copying it to the device? (miss: auto)

For one missing expert with n routed tokens (Fiddler, Kamahori et al. 2024, makes the same comparison):

    fetch = read + copy + n * flops_per_token / device_flops
    host  = read + n * flops_per_token / host_flops + n * token_s

`read` is the cost of getting the expert off disk (mmap tier only; both options pay it), `copy` the cost of
moving it into a device slot, `token_s` that of one token's activations there and back (zero when the
device is the host). Copy time and GEMM speeds are measured once at start-up (`calibrate`), on this machine
with this model's shapes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_runtime.config import ModelConfig
from moe_runtime.kernels.quant import new_weight, weight_bytes
from moe_runtime.offload.host_tier import HostTier


@dataclass(frozen=True)
class CostModel:
    flops_per_token: int  # 2 * 3 * D * I: the three matmuls of one token through one expert
    host_flops: float  # host GEMM flop/s at small M, measured
    device_flops: float  # device GEMM flop/s at small M, measured
    copy_s: float  # seconds to move one expert from host memory into a device slot, measured
    read_s: float = 0.0  # seconds to read one expert from storage (mmap tier), paid by both options
    token_s: float = 0.0  # seconds to move one token's activations to the host and back

    def fetch_s(self, n_tokens: int) -> float:
        return self.read_s + self.copy_s + n_tokens * self.flops_per_token / self.device_flops

    def host_s(self, n_tokens: int) -> float:
        return self.read_s + n_tokens * (self.flops_per_token / self.host_flops + self.token_s)

    def prefer_host(self, n_tokens: int) -> bool:
        """True when host compute is strictly cheaper (ties fetch: a fetched expert can hit next step)."""
        return self.host_s(n_tokens) < self.fetch_s(n_tokens)

    @classmethod
    def calibrate(cls, cfg: ModelConfig, tier: HostTier, device: torch.device, dtype: torch.dtype,
                  scheme: str = "none") -> CostModel:
        """Measure one expert's copy time and GEMM speed with this model's shapes (about 10-100 ms); experts
        stored in `scheme` (quantized ones move fewer bytes; their GEMMs are timed in `dtype`)."""
        D, I = cfg.hidden_size, cfg.intermediate_size  # noqa: E741 (dimension letters)
        w13 = new_weight((2 * I, D), dtype, scheme, device=device)  # [2I, D] a scratch slot
        w2 = new_weight((D, I), dtype, scheme, device=device)  # [D, I]
        nbytes = weight_bytes(w13) + weight_bytes(w2)
        moved_s = _best_of(lambda: tier.copy_into(cfg.moe_layers[0], 0, w13, w2), device)  # a sparse layer's
        host_flops = _gemm_flops(torch.device("cpu"), dtype, D, I)
        on_host = device.type == "cpu"
        return cls(
            flops_per_token=6 * D * I,
            host_flops=host_flops,
            device_flops=host_flops if on_host else _gemm_flops(device, dtype, D, I),
            # mmap tier: the measured time is mostly the read; on a CPU device the read lands in the slot
            copy_s=0.0 if tier.reads_storage and on_host else moved_s,
            read_s=moved_s if tier.reads_storage else 0.0,
            token_s=0.0 if on_host else 2 * D * dtype.itemsize * moved_s / nbytes,
        )


def _gemm_flops(device: torch.device, dtype: torch.dtype, D: int, I: int, m: int = 8) -> float:  # noqa: E741
    x = torch.randn(m, D, device=device).to(dtype)  # [m, D]
    w = torch.randn(2 * I, D, device=device).to(dtype)  # [2I, D]
    return 2 * m * 2 * I * D / _best_of(lambda: F.linear(x, w), device)


def _best_of(fn, device: torch.device, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up caches and allocators
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return max(best, 1e-9)
