"""Tune the Triton fused MoE tile configs on this GPU and write them as data (kernels/tuned/*.json).

    python bench/tune_fused_moe.py --shape mixtral --dtype bf16 --m 1,2,4,8,16,32,64,128,512,2048,4096

For each M it times the whole pipeline (align + both grouped GEMMs + combine) with every candidate
`TileConfig` and keeps the fastest; the file is named by `tile_config.table_path` so that
`tile_config_for` finds it (nearest M). Candidates are pruned by M: decode-sized batches only try
block_m = 16 (larger row tiles would be mostly padding). Expect ~1-2 s of compile per new config.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

import torch

from moe_runtime.kernels import route
from moe_runtime.kernels.tile_config import (
    TUNED_DIR,
    MoeShape,
    TileConfig,
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


def candidates(num_tokens: int, top_k: int, num_experts: int) -> list[TileConfig]:
    """The search space for one M: small row tiles while each expert has few rows."""
    rows_per_expert = num_tokens * top_k / num_experts
    block_ms = [16] if rows_per_expert <= 16 else [16, 32, 64, 128]
    out = []
    for bm, bn, bk, gm, warps, stages in itertools.product(
        block_ms, [32, 64, 128], [64, 128], [1, 8], [4, 8], [3, 4]
    ):
        if bm * bn >= 128 * 128 and warps == 4:
            continue  # big tiles on 4 warps spill registers
        out.append(TileConfig(bm, bn, bk, gm, warps, stages))
    return out


def tune_one(num_tokens: int, shape: dict, weights, dtype: torch.dtype, budget_s: float) -> TileConfig:
    import triton.testing

    w13, w2 = weights
    g = torch.Generator(device="cuda").manual_seed(num_tokens)
    hidden = torch.randn(num_tokens, shape["H"], device="cuda", generator=g, dtype=dtype)
    routing = route(torch.randn(num_tokens, shape["E"], device="cuda", generator=g), shape["k"])
    best, best_ms = None, math.inf
    start = time.monotonic()
    for cfg in candidates(num_tokens, shape["k"], shape["E"]):
        if time.monotonic() - start > budget_s:
            print(f"  M={num_tokens}: budget spent, keeping the best so far", file=sys.stderr)
            break
        try:
            ms = triton.testing.do_bench(lambda c=cfg: fused_moe_triton(hidden, w13, w2, routing, None, c), rep=20)
        except Exception as err:  # out of shared memory, too many registers: skip the config
            print(f"  skip {cfg}: {type(err).__name__}", file=sys.stderr)
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    print(f"M={num_tokens}: {best_ms * 1e3:.1f} us {best}")
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="mixtral", choices=list(SHAPES))
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--m", default="1,2,4,8,16,32,64,128,512,2048,4096")
    p.add_argument("--budget-s", type=float, default=120.0, help="tuning time per M")
    p.add_argument("--out-dir", type=Path, default=TUNED_DIR)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune_fused_moe.py needs a CUDA GPU (tile configs are per device)")

    s, dtype = SHAPES[args.shape], DTYPES[args.dtype]
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(s["E"], 2 * s["I"], s["H"], device="cuda", generator=g, dtype=dtype) / s["H"] ** 0.5
    w2 = torch.randn(s["E"], s["H"], s["I"], device="cuda", generator=g, dtype=dtype) / s["I"] ** 0.5
    table = {m: tune_one(m, s, (w13, w2), dtype, args.budget_s) for m in map(int, args.m.split(","))}
    shape = MoeShape(num_experts=s["E"], intermediate=s["I"], dtype=dtype, device_name=device_name(w13.device))
    path = table_path(shape, args.out_dir)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    save_table(path, table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
