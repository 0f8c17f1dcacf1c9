"""The native small-M CPU linear (kernels/cpu) vs torch's bf16 and fp32 matmuls, same process, same run.

    .venv/bin/python bench/cpu_linear.py                          # mini's shapes, M = 1..64, 1 thread
    .venv/bin/python bench/cpu_linear.py --threads 2 --rows 1,4,16 --repeats 7

y[M, N] = x[M, K] @ W[N, K]^T with W in bf16 (fp16 with --dtype float16). Columns: milliseconds per call
(median of `--repeats` timings of `--inner` calls each, ours and torch's taking turns), our speed-up over
torch in the weights' dtype and over torch fp32 (weights already fp32: the fp32 copies' path, twice the
bytes), and our GB/s of weight read against the streaming read bandwidth measured in the same run. The
weights of each shape are larger than the last-level cache's share, so they come from memory each call:
several copies are cycled through. `expert` rows: one expert's whole SwiGLU MLP (w13, SiLU*up, w2),
ours (`expert_mlp`) vs the torch backend's (`kernels.torch_moe`: a bf16 GEMM below UPCAST_MIN_ROWS
rows, chunked fp32 from there).

On a CPU with AVX512-BF16 (and bf16 weights) "ours" runs the `vdpbf16ps` tiles (kernels/cpu/dot_bf16.h) at
every row count and a column "ours AVX2" the AVX2 tiles, with their ratio: what the engine's measured plan
(`moe-runtime info`: "native bf16 tiles") chooses between.

    .venv/bin/python bench/cpu_linear.py --quantization int8 --threads 2 --rows 1,4,16

int8 weights (kernels/quant.py, quantized from the same bf16 weights): "ours int8" runs the native int8
GEMM, with the `vdpbf16ps` tiles at every row count where the CPU has AVX512-BF16 ("native int8 tiles"),
beside the same int8 weights on the AVX2 tiles and the bf16 weights on ours (its tiles too) and on torch
(the torch backend's expert for `expert` rows), each with its ratio to ours int8; GB/s counts int8 bytes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from moe_runtime.kernels import cpu
from moe_runtime.kernels.quant import quantize
from moe_runtime.kernels.torch_moe import _expert_mlp

# name, N, K: mini's (hidden 1024, intermediate 3584, 16 heads x 64, 4 kv heads, vocab 32000)
SHAPES = (
    ("q/o_proj", 1024, 1024),
    ("k/v_proj", 256, 1024),
    ("w13", 7168, 1024),
    ("w2", 1024, 3584),
    ("lm_head", 32000, 1024),
)
COPIES_BYTES = 256 << 20  # cycle through this many bytes of weight copies: more than any L3 share


def read_bandwidth() -> float:
    buf = torch.ones(128 << 20, dtype=torch.float32)
    best = min(_timed(buf.sum) for _ in range(5))
    return buf.numel() * 4 / best


def _timed(fn, inner: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def _cycle(tensors):
    state = {"i": 0}

    def next_one():
        state["i"] = (state["i"] + 1) % len(tensors)
        return tensors[state["i"]]

    return next_one


def compare(fns: dict, repeats: int, inner: int) -> dict[str, float]:
    """Median seconds per call of each function, interleaved round by round."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn, inner))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--inner", type=int, default=5)
    ap.add_argument("--shapes", default=",".join(s[0] for s in SHAPES) + ",expert")
    ap.add_argument("--quantization", default="none", choices=["none", "int8"],
                    help="int8: int8 weights on ours (tiles and AVX2) against bf16 (module docstring)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu.available():
        raise SystemExit("the native CPU kernels are not available here (see the warning above)")
    dtype = getattr(torch, args.dtype)
    bandwidth = read_bandwidth()
    wanted = args.shapes.split(",")
    print(
        f"threads {args.threads}; weights {args.dtype}; read bandwidth {bandwidth / 1e9:.1f} GB/s; "
        f"median of {args.repeats} x {args.inner} calls; CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}\n"
    )
    global TILES
    TILES = dtype == torch.bfloat16 and cpu.has_avx512_bf16()
    if args.quantization == "int8":
        return int8_tables(args, dtype, bandwidth)
    if TILES:
        print("(this CPU has AVX512-BF16: ours = the vdpbf16ps tiles, ours AVX2 = the AVX2 tiles)\n")
    print(
        "| shape | M | ours ms | torch 16-bit ms | torch fp32 ms | vs 16-bit | vs fp32 | ours GB/s | % of read "
        "| ours AVX2 ms | ours vs AVX2 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for name, N, K in SHAPES:
        if name not in wanted:
            continue
        n_copies = max(1, COPIES_BYTES // (N * K * 2))
        ws = [(torch.randn(N, K, generator=gen) / 10).to(dtype) for _ in range(n_copies)]
        wfs = [w.float() for w in ws[: max(1, n_copies // 2)]]
        for M in map(int, args.rows.split(",")):
            x = (torch.randn(M, K, generator=gen) / 10).to(dtype)
            w_ours, w_torch, w_fp32 = _cycle(ws), _cycle(ws), _cycle(wfs)
            t = compare(
                {
                    "ours": _tiles(1, lambda x=x, w=w_ours: cpu.linear(x, w())),
                    "torch": lambda x=x, w=w_torch: F.linear(x, w()),
                    "fp32": lambda x=x, w=w_fp32: F.linear(x.float(), w()),
                    **({"avx2": _tiles(0, lambda x=x, w=w_ours: cpu.linear(x, w()))} if TILES else {}),
                },
                args.repeats,
                args.inner,
            )
            _row(name, M, t, N * K * 2, bandwidth)
    if "expert" in wanted:
        H, I = 1024, 3584
        n_copies = max(1, COPIES_BYTES // (3 * H * I * 2))
        experts = [
            (
                (torch.randn(2 * I, H, generator=gen) / 10).to(dtype),
                (torch.randn(H, I, generator=gen) / 10).to(dtype),
            )
            for _ in range(n_copies)
        ]
        for M in map(int, args.rows.split(",")):
            x = (torch.randn(M, H, generator=gen) / 10).to(dtype)
            e_ours, e_torch = _cycle(experts), _cycle(experts)
            t = compare(
                {
                    "ours": _tiles(1, lambda x=x, e=e_ours: cpu.expert_mlp(x, *e())),
                    "torch": lambda x=x, e=e_torch: _expert_mlp(x, *e()),
                    **({"avx2": _tiles(0, lambda x=x, e=e_ours: cpu.expert_mlp(x, *e()))} if TILES else {}),
                },
                args.repeats,
                args.inner,
            )
            t["fp32"] = float("nan")
            _row("expert", M, t, 3 * H * I * 2, bandwidth)


def int8_tables(args, dtype: torch.dtype, bandwidth: float) -> None:
    """The `--quantization int8` table: ours on int8 weights (tiles, AVX2) vs bf16 weights (ours, torch)."""
    if TILES:
        print("(this CPU has AVX512-BF16: ours int8 = the vdpbf16ps tiles on int8 weights, int8 AVX2 = the AVX2 "
              "tiles on them, ours bf16 = the vdpbf16ps tiles on bf16 weights)\n")
    print("| shape | M | ours int8 ms | int8 AVX2 ms | vs int8 AVX2 | ours bf16 ms | vs ours bf16 | torch bf16 ms "
          "| vs torch bf16 | int8 GB/s | % of read |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    gen, wanted = torch.Generator().manual_seed(0), args.shapes.split(",")
    groups = [(name, ((N, K),)) for name, N, K in SHAPES if name in wanted]
    if "expert" in wanted:
        groups.append(("expert", ((2 * 3584, 1024), (1024, 3584))))  # mini's w13, w2
    for name, shapes in groups:
        n_copies = max(1, COPIES_BYTES // sum(N * K * 2 for N, K in shapes))
        ws = [tuple((torch.randn(N, K, generator=gen) / 10).to(dtype) for N, K in shapes) for _ in range(n_copies)]
        qs = [tuple(quantize(w.float(), "int8") for w in group) for group in ws]
        ours = cpu.expert_mlp if name == "expert" else cpu.linear
        torch_fn = _expert_mlp if name == "expert" else F.linear
        for M in map(int, args.rows.split(",")):
            x = (torch.randn(M, shapes[0][1], generator=gen) / 10).to(dtype)
            q_ours, q_avx2, w_ours, w_torch = _cycle(qs), _cycle(qs), _cycle(ws), _cycle(ws)
            t = compare(
                {
                    "ours": _tiles(1, lambda x=x, q=q_ours, f=ours: f(x, *q())),
                    "avx2": _tiles(0, lambda x=x, q=q_avx2, f=ours: f(x, *q())),
                    "bf16": _tiles(1, lambda x=x, w=w_ours, f=ours: f(x, *w())),
                    "torch": lambda x=x, w=w_torch, f=torch_fn: f(x, *w()),
                },
                args.repeats,
                args.inner,
            )
            gbs = sum(q.nbytes() for q in qs[0]) / t["ours"]
            print(
                f"| {name} | {M} | {t['ours'] * 1e3:.3f} | {t['avx2'] * 1e3:.3f} | {t['avx2'] / t['ours']:.2f}x "
                f"| {t['bf16'] * 1e3:.3f} | {t['bf16'] / t['ours']:.2f}x | {t['torch'] * 1e3:.3f} "
                f"| {t['torch'] / t['ours']:.2f}x | {gbs / 1e9:.1f} | {100 * gbs / bandwidth:.0f}% |",
                flush=True,
            )


TILES = False  # whether "ours" runs the AVX512-BF16 tiles, with an AVX2 column beside it (set in main)


def _tiles(rows: int, fn):
    """fn with the native GEMM's AVX512-BF16 tiles from `rows` rows (0: AVX2 tiles only) for bf16 and int8
    weights alike, where the CPU has them."""
    def call():
        cpu.dot_bf16_rows(rows)
        cpu.dot_int8_rows(rows)
        return fn()

    return call if TILES else fn


def _row(name: str, M: int, t: dict[str, float], weight_bytes: int, bandwidth: float) -> None:
    gbs = weight_bytes / t["ours"]
    avx2 = t.get("avx2", float("nan"))
    print(
        f"| {name} | {M} | {t['ours'] * 1e3:.3f} | {t['torch'] * 1e3:.3f} | {t['fp32'] * 1e3:.3f} "
        f"| {t['torch'] / t['ours']:.2f}x | {t['fp32'] / t['ours']:.2f}x | {gbs / 1e9:.1f} "
        f"| {100 * gbs / bandwidth:.0f}% | {avx2 * 1e3:.3f} | {avx2 / t['ours']:.2f}x |",
        flush=True,
    )


if __name__ == "__main__":
    main()
