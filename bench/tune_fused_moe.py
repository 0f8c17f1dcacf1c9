"""Tune the Triton fused MoE tile configs on this GPU and write them as data (kernels/tuned/*.json).

    python bench/tune_fused_moe.py --shape mixtral --dtype bf16 --m 1,2,4,8,16,32,64,128,512,2048,4096
    python bench/tune_fused_moe.py --shape mixtral --dtype int8_w8a16 --m 1,2,4,8,16,32,64  # 8-bit experts

`--dtype` is the table's format (`tile_config.TABLE_FORMATS`): bf16 / fp16 experts, or 8-bit experts
quantized from random bf16 ones with bf16 activations: int8 or fp8 weights widened in the GEMMs
(`int8_w8a16`, `fp8_w8a16`, `fused_moe_triton_fp32`), or fp8 weights with activations quantized per token
(`fp8_w8a8`, `fused_moe_triton_w8a8_fp32`, compute capability >= 8.9).

For each M it times the whole layer as `kernels.fused_moe` runs it (align + both grouped GEMMs + combine +
the final cast to the input dtype), replayed from a CUDA graph, with the heuristic default and every
candidate `TileConfig` (then, from 8 rows per expert up, tiles of GEMM 2's own), keeps the fastest, and
prints its speedup over the heuristic; the file is named by `tile_config.table_path` so that
`tile_config_for` finds it (nearest M). Candidates depend on the rows per expert (see `candidates`) and are
pruned by shared memory before compiling. Expect ~1-3 s of compile per new config; compiled kernels are
reused across M, and `--budget-s` bounds the whole run.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from moe_runtime.kernels import route
from moe_runtime.kernels.quant import SCHEMES, quantize
from moe_runtime.kernels.tile_config import (
    TABLE_FORMATS,
    TUNED_DIR,
    MoeShape,
    TileConfig,
    default_tile_config,
    device_name,
    save_table,
    table_path,
)
from moe_runtime.kernels.triton.fused_moe import fused_moe_triton_fp32, fused_moe_triton_w8a8_fp32

SHAPES = {
    "mixtral": dict(H=4096, I=14336, E=8, k=2),
    "mini": dict(H=1024, I=3584, E=8, k=2),
    # the other families' released shapes (configs/models/ holds Qwen3-30B-A3B's config.json)
    "qwen3-30b-a3b": dict(H=2048, I=768, E=128, k=8),
    "qwen1.5-moe-a2.7b": dict(H=2048, I=1408, E=60, k=4),
    "olmoe-1b-7b": dict(H=2048, I=1024, E=64, k=8),
}
FORMATS = ("bf16", "fp16", "int8_w8a16", "fp8_w8a16", "fp8_w8a8")  # the `--dtype` choices


def hidden_dtype(fmt: str) -> torch.dtype:
    """The activations' dtype of a format: its own for 16-bit experts, bf16 for 8-bit ones."""
    dtype, _ = TABLE_FORMATS[fmt]
    return dtype if dtype.itemsize == 2 else torch.bfloat16


def experts(shape: dict, fmt: str, generator: torch.Generator | None = None) -> tuple:
    """Random w13 [E, 2I, H] and w2 [E, H, I] scaled by 1/sqrt(fan_in), stored as `fmt` stores experts
    (8-bit: quantized per row from the bf16 values, `kernels.quant.quantize`)."""
    dtype, _ = TABLE_FORMATS[fmt]
    w13 = torch.randn(shape["E"], 2 * shape["I"], shape["H"], device="cuda", generator=generator) / shape["H"] ** 0.5
    w2 = torch.randn(shape["E"], shape["H"], shape["I"], device="cuda", generator=generator) / shape["I"] ** 0.5
    if dtype.itemsize == 2:
        return w13.to(dtype), w2.to(dtype)
    scheme = next(name for name, d in SCHEMES.items() if d == dtype)
    return quantize(w13.bfloat16(), scheme), quantize(w2.bfloat16(), scheme)


def moe_of(fmt: str):
    """The Triton MoE that runs a format's experts (same signature: hidden, w13, w2, routing, slot_map,
    config)."""
    return fused_moe_triton_w8a8_fp32 if fmt == "fp8_w8a8" else fused_moe_triton_fp32


# Shared memory per program on Hopper (227 KB usable); candidates whose pipelined tiles exceed it are
# dropped before compiling (compiling them only to fail at launch would eat the tuning budget).
SMEM_LIMIT = 227 * 1024


def smem_bytes(cfg: TileConfig, gemm: int = 1, elem: int = 2) -> int:
    """Pipelined shared memory of one grouped GEMM: per stage an activation tile plus one weight tile
    (GEMM 2) or two (GEMM 1: gate and up)."""
    weight_tiles = 2 if gemm == 1 else 1
    return cfg.num_stages * (cfg.block_m * cfg.block_k + weight_tiles * cfg.block_k * cfg.block_n) * elem


def fits(cfg: TileConfig, gemm: int) -> bool:
    """Whether cfg is worth compiling for that GEMM: shared memory within the limit, accumulators that do
    not spill (GEMM 1 keeps two, so its tiles stop at 128x128), and 8 warps only for tiles that feed them."""
    acc_limit = 128 * 128 if gemm == 1 else 128 * 256
    tile = cfg.block_m * cfg.block_n
    if tile > acc_limit or smem_bytes(cfg, gemm) > SMEM_LIMIT:
        return False
    return cfg.num_warps == 8 if tile >= 128 * 128 else not (cfg.num_warps == 8 and tile < 64 * 128)


def candidates(num_tokens: int, top_k: int, num_experts: int) -> list[TileConfig]:
    """The search space for one M (tiles shared by both GEMMs), in three regimes of rows per expert:

    - decode (< 8 rows): one 16-row tile per expert, the GEMMs stream weights, so the space is about
      memory parallelism: output width (programs in flight), K step and pipeline depth;
    - middle (8 to 128): 16- to 64-row tiles, so that an expert's rows fit one tile and its weights are
      read once;
    - prefill: 64/128-row tiles on 4 or 8 warps.
    """
    rows_per_expert = num_tokens * top_k / num_experts
    if rows_per_expert < 8:
        space = itertools.product([16], [32, 64, 128], [128, 256], [1], [4], [3, 4, 5])
    elif rows_per_expert <= 128:
        space = itertools.product([16, 32, 64], [64, 128], [64, 128], [8], [4, 8], [3, 4])
    else:
        space = itertools.product([64, 128], [64, 128, 256], [64], [8], [4, 8], [3, 4])
    return [cfg for cfg in (TileConfig(*p) for p in space) if fits(cfg, gemm=1)]


def gemm2_candidates(base: TileConfig) -> list[TileConfig]:
    """Tiles for grouped GEMM 2 alone, with base's block_m: it has one accumulator, so wider tiles fit."""
    space = itertools.product([64, 128, 256], [64, 128], [8], [4, 8], [3, 4])
    out = []
    for bn, bk, gm, warps, stages in space:
        cfg = TileConfig(base.block_m, bn, bk, gm, warps, stages)
        if fits(cfg, gemm=2) and cfg != base:
            out.append(cfg)
    return out


def configs_to_try(num_tokens: int, top_k: int, num_experts: int) -> list[TileConfig]:
    """Every config `tune_one` may launch for this M, whatever wins stage one: the heuristic, the shared
    candidates, and GEMM 2's own tiles for each block_m of the regime (the GEMM 1 half of those is already
    among the shared candidates, so only GEMM 2 compiles anew)."""
    shared = candidates(num_tokens, top_k, num_experts)
    out = [default_tile_config(num_tokens, top_k, num_experts), *shared]
    if num_tokens * top_k / num_experts >= 8:
        for bm in sorted({c.block_m for c in shared}):
            base = next(c for c in shared if c.block_m == bm)
            out += [replace(base, gemm2=c) for c in gemm2_candidates(base)]
    return out


def _compile(job: tuple[str, str, list[tuple[int, TileConfig]]]) -> int:
    """Worker: launch each (M, config) once on throwaway inputs of the real shapes, which compiles its
    kernels into Triton's on-disk cache (shared with the parent). Returns how many launched."""
    shape_name, fmt, items = job
    s = SHAPES[shape_name]
    w13, w2 = experts(s, fmt)
    done = 0
    for m, cfg in items:
        hidden = torch.randn(m, s["H"], device="cuda", dtype=hidden_dtype(fmt))
        try:
            routing = route(torch.randn(m, s["E"], device="cuda"), s["k"])
            moe_of(fmt)(hidden, w13, w2, routing, None, cfg)
            done += 1
        except Exception:  # a config this GPU cannot run: tune_one reports it
            pass
    torch.cuda.synchronize()
    return done


def precompile(shape_name: str, fmt: str, ms: list[int], workers: int) -> None:
    """Compile every config the tuning will launch, in parallel processes (Triton compiles on one core;
    a serial tuner spends most of its time there). Each worker takes whole configs, for all their M, so
    no kernel is compiled twice. Any failure here only means the tuner compiles as it goes."""
    s = SHAPES[shape_name]
    by_cfg: dict[TileConfig, list[int]] = {}
    for m in ms:
        for cfg in configs_to_try(m, s["k"], s["E"]):
            by_cfg.setdefault(cfg, []).append(m)
    shards: list[list[tuple[int, TileConfig]]] = [[] for _ in range(workers)]
    for i, (cfg, cfg_ms) in enumerate(by_cfg.items()):
        shards[i % workers] += [(m, cfg) for m in cfg_ms]
    start = time.monotonic()
    try:
        ctx = torch.multiprocessing.get_context("spawn")
        with ctx.Pool(workers) as pool:
            launched = sum(pool.map(_compile, [(shape_name, fmt, shard) for shard in shards if shard]))
        print(f"precompiled {len(by_cfg)} configs ({launched} launches) in {workers} processes, "
              f"{time.monotonic() - start:.0f} s", flush=True)  # fmt: skip
    except Exception as err:
        print(
            f"precompile failed ({type(err).__name__}: {err}); compiling as the tuning goes", file=sys.stderr
        )


def moe_layer(moe, hidden, w13, w2, routing, config: TileConfig) -> torch.Tensor:
    """The Triton MoE `moe` as the engine runs it (`kernels.fused_moe`: fp32 pipeline, rounded once), with
    fixed tiles. hidden [T, H]; w13 [E, 2I, H]; w2 [E, H, I]. Returns [T, H] in hidden's dtype."""
    return moe(hidden, w13, w2, routing, None, config).to(hidden.dtype)


def graph_time(fn) -> float:
    """Median ms of fn replayed from a CUDA graph (how an engine runs a step: no per-launch CPU cost, so
    small-M timings measure the kernels, not Python)."""
    import triton.testing

    fn()  # compile and allocate outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    try:
        return triton.testing.do_bench(graph.replay, rep=20)
    finally:
        del graph


def tune_one(
    num_tokens: int, shape: dict, weights, fmt: str, budget_s: float
) -> tuple[TileConfig, float, float]:
    """The fastest candidate for M = num_tokens within budget_s (shared tiles first, then GEMM 2's own
    tiles once each expert has 8 rows or more), its time and the heuristic's, in ms."""
    w13, w2 = weights
    moe = moe_of(fmt)
    g = torch.Generator(device="cuda").manual_seed(num_tokens)
    hidden = torch.randn(num_tokens, shape["H"], device="cuda", generator=g, dtype=hidden_dtype(fmt))
    routing = route(torch.randn(num_tokens, shape["E"], device="cuda", generator=g), shape["k"])
    deadline = time.monotonic() + budget_s

    def best_of(configs: list[TileConfig], best: TileConfig, best_ms: float) -> tuple[TileConfig, float]:
        for cfg in configs:
            if time.monotonic() > deadline:
                print(f"  M={num_tokens}: budget spent, keeping the best so far", file=sys.stderr)
                break
            try:
                ms = graph_time(lambda c=cfg: moe_layer(moe, hidden, w13, w2, routing, c))
            except Exception as err:  # out of shared memory, too many registers: skip the config
                print(f"  skip {cfg}: {type(err).__name__}", file=sys.stderr)
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
        return best, best_ms

    heuristic = default_tile_config(num_tokens, shape["k"], shape["E"])
    heuristic_ms = graph_time(lambda: moe_layer(moe, hidden, w13, w2, routing, heuristic))
    best, best_ms = best_of(candidates(num_tokens, shape["k"], shape["E"]), heuristic, heuristic_ms)
    if num_tokens * shape["k"] / shape["E"] >= 8:
        split = [replace(best, gemm2=c) for c in gemm2_candidates(best)]
        best, best_ms = best_of(split, best, best_ms)
    # The winner must compute what the heuristic computes (the same inputs and arithmetic, fp32
    # accumulation, compared before the final rounding; outputs are O(1) here, so 3e-2 is a few bf16 ulps):
    # a fast wrong config never reaches the table.
    want = moe(hidden, w13, w2, routing, None, heuristic)
    got = moe(hidden, w13, w2, routing, None, best)
    if not torch.allclose(got, want, atol=3e-2, rtol=0):
        err = (got - want).abs().max().item()
        print(
            f"  M={num_tokens}: {best} differs from the heuristic by {err:.3g}; keeping the heuristic",
            file=sys.stderr,
        )
        best, best_ms = heuristic, heuristic_ms
    print(f"M={num_tokens}: {best_ms * 1e3:.1f} us (heuristic {heuristic_ms * 1e3:.1f} us, "
          f"{heuristic_ms / best_ms:.2f}x) {best}", flush=True)  # fmt: skip
    return best, best_ms, heuristic_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="mixtral", choices=list(SHAPES))
    p.add_argument("--dtype", default="bf16", choices=FORMATS, help="the table's format (module docstring)")
    p.add_argument("--m", default="1,2,4,8,16,32,64,128,512,2048,4096")
    p.add_argument("--budget-s", type=float, default=600.0, help="tuning time for all M together")
    p.add_argument("--out-dir", type=Path, default=TUNED_DIR)
    p.add_argument("--workers", type=int, default=min(12, max((os.cpu_count() or 2) - 2, 1)),
                   help="processes that compile the candidates first (1: compile as the tuning goes)")  # fmt: skip
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune_fused_moe.py needs a CUDA GPU (tile configs are per device)")
    ms = sorted(int(m) for m in args.m.split(","))
    if args.workers > 1:
        precompile(args.shape, args.dtype, ms, args.workers)

    s = SHAPES[args.shape]
    w13, w2 = experts(s, args.dtype, torch.Generator(device="cuda").manual_seed(0))
    # The budget is split between the regimes by their number of candidates: the first M of a regime pays
    # any compile left, the later ones reuse the compiled kernels and only time them (~0.1 s per config).
    groups: dict[tuple[TileConfig, ...], list[int]] = {}
    for m in ms:
        groups.setdefault(tuple(candidates(m, s["k"], s["E"])), []).append(m)
    total = sum(len(space) for space in groups)
    dtype, activations = TABLE_FORMATS[args.dtype]
    shape = MoeShape(num_experts=s["E"], intermediate=s["I"], dtype=dtype, device_name=device_name(w13.device),
                     activations=activations)
    path = table_path(shape, args.out_dir)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    table: dict[int, TileConfig] = {}
    for space, group in groups.items():
        group_deadline = time.monotonic() + args.budget_s * len(space) / total
        for m in group:
            table[m], _, _ = tune_one(m, s, (w13, w2), args.dtype, max(group_deadline - time.monotonic(), 5.0))
            save_table(path, table)  # after every M, so a run cut short keeps what it found
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
