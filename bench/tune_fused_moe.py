"""Tune the Triton fused MoE tile configs on this GPU and write them as data (kernels/tuned/*.json).

    python bench/tune_fused_moe.py --shape mixtral --dtype bf16 --m 1,2,4,8,16,32,64,128,512,2048,4096

For each M it times the whole pipeline (align + both grouped GEMMs + combine) with the heuristic default
and every candidate `TileConfig`, keeps the fastest, and prints its speedup over the heuristic; the file
is named by `tile_config.table_path` so that `tile_config_for` finds it (nearest M). Candidates depend on
the rows per expert (see `candidates`) and are pruned by shared memory before compiling. Expect ~1-3 s of
compile per new config; compiled kernels are reused across M, and `--budget-s` bounds the whole run.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

from moe_runtime.kernels import route
from moe_runtime.kernels.tile_config import (
    TUNED_DIR,
    MoeShape,
    TileConfig,
    default_tile_config,
    device_name,
    save_table,
    table_path,
)
from moe_runtime.kernels.triton.fused_moe import fused_moe_triton

SHAPES = {
    "mixtral": dict(H=4096, I=14336, E=8, k=2),
    "mini": dict(H=1024, I=3584, E=8, k=2),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# Shared memory per program on Hopper (227 KB usable); candidates whose pipelined tiles exceed it are
# dropped before compiling (compiling them only to fail at launch would eat the tuning budget).
SMEM_LIMIT = 227 * 1024


def smem_bytes(cfg: TileConfig, elem: int = 2) -> int:
    """Pipelined shared memory of grouped GEMM 1, the larger of the two: per stage an x tile and the gate
    and up weight tiles."""
    return cfg.num_stages * (cfg.block_m * cfg.block_k + 2 * cfg.block_k * cfg.block_n) * elem


def candidates(num_tokens: int, top_k: int, num_experts: int) -> list[TileConfig]:
    """The search space for one M, in three regimes of rows per expert (what a weight tile is reused for):

    - decode (<= 16 rows): one 16-row tile per expert, the GEMMs stream weights, so the space is about
      memory parallelism: output width (programs in flight), K step and pipeline depth;
    - middle (<= 128): 32/64-row tiles;
    - prefill: 64/128-row tiles on 4 or 8 warps (GEMM 1 keeps two fp32 accumulators, so tiles above
      128x128 would spill).
    """
    rows_per_expert = num_tokens * top_k / num_experts
    if rows_per_expert <= 16:
        space = itertools.product([16], [32, 64, 128], [128, 256], [1], [4], [3, 4, 5])
    elif rows_per_expert <= 128:
        space = itertools.product([32, 64], [64, 128], [64, 128], [8], [4, 8], [3, 4])
    else:
        space = itertools.product([64, 128], [64, 128, 256], [64], [8], [4, 8], [3, 4])
    out = []
    for bm, bn, bk, gm, warps, stages in space:
        cfg = TileConfig(bm, bn, bk, gm, warps, stages)
        too_big = bm * bn > 128 * 128 or (bm * bn >= 128 * 128 and warps == 4) or smem_bytes(cfg) > SMEM_LIMIT
        if too_big or (warps == 8 and bm * bn < 64 * 128):  # small tiles do not feed 8 warps
            continue
        out.append(cfg)
    return out


def tune_one(
    num_tokens: int, shape: dict, weights, dtype: torch.dtype, budget_s: float
) -> tuple[TileConfig, float, float]:
    """The fastest candidate for M = num_tokens within budget_s, its time and the heuristic's (ms)."""
    import triton.testing

    w13, w2 = weights
    g = torch.Generator(device="cuda").manual_seed(num_tokens)
    hidden = torch.randn(num_tokens, shape["H"], device="cuda", generator=g, dtype=dtype)
    routing = route(torch.randn(num_tokens, shape["E"], device="cuda", generator=g), shape["k"])

    def bench(cfg: TileConfig) -> float:
        return triton.testing.do_bench(lambda: fused_moe_triton(hidden, w13, w2, routing, None, cfg), rep=20)

    heuristic = default_tile_config(num_tokens, shape["k"], shape["E"])
    best, best_ms = heuristic, bench(heuristic)
    heuristic_ms = best_ms
    start = time.monotonic()
    for cfg in candidates(num_tokens, shape["k"], shape["E"]):
        if time.monotonic() - start > budget_s:
            print(f"  M={num_tokens}: budget spent, keeping the best so far", file=sys.stderr)
            break
        try:
            ms = bench(cfg)
        except Exception as err:  # out of shared memory, too many registers: skip the config
            print(f"  skip {cfg}: {type(err).__name__}", file=sys.stderr)
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    print(f"M={num_tokens}: {best_ms * 1e3:.1f} us (heuristic {heuristic_ms * 1e3:.1f} us, "
          f"{heuristic_ms / best_ms:.2f}x) {best}", flush=True)  # fmt: skip
    return best, best_ms, heuristic_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="mixtral", choices=list(SHAPES))
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--m", default="1,2,4,8,16,32,64,128,512,2048,4096")
    p.add_argument("--budget-s", type=float, default=600.0, help="tuning time for all M together")
    p.add_argument("--out-dir", type=Path, default=TUNED_DIR)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune_fused_moe.py needs a CUDA GPU (tile configs are per device)")

    s, dtype = SHAPES[args.shape], DTYPES[args.dtype]
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(s["E"], 2 * s["I"], s["H"], device="cuda", generator=g, dtype=dtype) / s["H"] ** 0.5
    w2 = torch.randn(s["E"], s["H"], s["I"], device="cuda", generator=g, dtype=dtype) / s["I"] ** 0.5
    # The budget is split between the regimes by their number of candidates: the first M of a regime pays
    # the compiles, the later ones reuse the compiled kernels and only time them (~0.1 s per config).
    ms = sorted(int(m) for m in args.m.split(","))
    groups: dict[tuple[TileConfig, ...], list[int]] = {}
    for m in ms:
        groups.setdefault(tuple(candidates(m, s["k"], s["E"])), []).append(m)
    total = sum(len(space) for space in groups)
    shape = MoeShape(
        num_experts=s["E"], intermediate=s["I"], dtype=dtype, device_name=device_name(w13.device)
    )
    path = table_path(shape, args.out_dir)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    table: dict[int, TileConfig] = {}
    for space, group in groups.items():
        group_deadline = time.monotonic() + args.budget_s * len(space) / total
        for m in group:
            table[m], _, _ = tune_one(m, s, (w13, w2), dtype, max(group_deadline - time.monotonic(), 5.0))
            save_table(path, table)  # after every M, so a run cut short keeps what it found
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
