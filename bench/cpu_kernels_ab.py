"""The native CPU kernels of this tree against those of another git revision, same process, same run.

    .venv/bin/python bench/cpu_kernels_ab.py --rev HEAD~1                 # mini's MoE layer, bf16 and int8
    .venv/bin/python bench/cpu_kernels_ab.py --rev 265826f --tokens 1,16 --repeats 15
    .venv/bin/python bench/cpu_kernels_ab.py --schemes fp8 --hidden 4096 --inter 14336   # Mixtral's experts
    .venv/bin/python bench/cpu_kernels_ab.py --schemes int8,fp8 --hot 2048x2048 --tokens 1,2,4 --dot-rows 1

The baseline for a kernel change: `kernels/cpu/` as it was at `--rev` (sources read with `git show`) is
built beside the tree's, under another extension name, and both run one MoE layer in turn (`moe_decode`:
router, top-k, the routed experts' SwiGLU MLPs; mini's shapes by default) for T tokens, on the same weights
(copies cycled through, larger than the last-level cache together: decode reads experts from memory). Both
take the tiles the same way: the `vdpbf16ps` tiles from `--dot-rows` rows on (AVX512-BF16 CPUs; 0: AVX2
tiles only), whatever a plan would choose, so that the change itself is what differs.

`--hot NxK` times one GEMM instead, `linear_fp32` of T rows against one [N, K] weight that stays in the
last-level cache: what the tiles compute when memory is not the limit (a widening's cost, which the memory
bound hides whenever the host streams slowly).

Columns: milliseconds per layer (median of `--repeats`), the experts the tokens reached, the tree's speed-up
over the revision, and the tree's GB/s of expert weights read with the streaming read bandwidth measured in
the same run (bench/engine_throughput.py `read_bandwidth`) beside it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine_throughput import read_bandwidth  # noqa: E402

from moe_runtime.kernels import cpu  # noqa: E402
from moe_runtime.kernels.cpu.dispatch import COLD_BYTES, machine_key  # noqa: E402
from moe_runtime.kernels.quant import QuantizedWeight, quantize  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KERNELS = "kernels/cpu"


def build_revision(rev: str, where: Path):
    """The native kernels of `rev`, built under a name of their own (the tree's keep theirs)."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{sha}:{KERNELS}"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in names:
        if name.endswith((".cpp", ".h")):
            blob = subprocess.run(["git", "show", f"{sha}:{KERNELS}/{name}"], cwd=ROOT, check=True,
                                  capture_output=True).stdout
            (where / name).write_bytes(blob)
    from torch.utils.cpp_extension import load

    sources = [str(where / s) for s in cpu.SOURCES if (where / s).exists()]
    print(f"building the kernels of {rev} ({sha}) for comparison", file=sys.stderr)
    return sha, load(name=f"moe_runtime_cpu_ab_{sha}", sources=sources, extra_cflags=cpu._FLAGS,
                     extra_include_paths=[str(where)], extra_ldflags=["-fopenmp"])


def layers(hidden: int, inter: int, experts: int, scheme: str) -> list[tuple]:
    """Weight copies of one MoE layer (w13, w2, gate), together more than COLD_BYTES."""
    def weight(shape):
        w = (torch.randn(shape) / 16).bfloat16()
        return w if scheme == "bf16" else quantize(w, scheme)

    per = experts * 3 * inter * hidden * (2 if scheme == "bf16" else 1)
    return [(weight((experts, 2 * inter, hidden)), weight((experts, hidden, inter)),
             (torch.randn(experts, hidden) / 16).bfloat16()) for _ in range(max(2, -(-COLD_BYTES // per)))]


def call(ext, hidden: torch.Tensor, layer: tuple, top_k: int, counts: torch.Tensor) -> torch.Tensor:
    w13, w2, gate = layer
    if isinstance(w13, QuantizedWeight):
        return ext.moe_decode(hidden, gate, w13.data, w2.data, top_k, counts, True, w13.scale, w2.scale)
    return ext.moe_decode(hidden, gate, w13, w2, top_k, counts, True)


def set_tiles(ext, rows: int, schemes: list[str]) -> None:
    if cpu.has_avx512_bf16():
        ext.set_dot_bf16_min_rows(rows)
        if "int8" in schemes:  # revisions before f9387d8 have no int8 tiles: compare them with --schemes bf16
            ext.set_dot_int8_min_rows(rows)
        if "fp8" in schemes:  # nor fp8 ones before 3e4ae2a
            ext.set_dot_fp8_min_rows(rows)


def hot(tree, base, sha: str, schemes: list[str], args) -> None:
    """`--hot`: T rows of x against one [N, K] weight small enough to stay cached, 20 calls per timing."""
    n, k = (int(v) for v in args.hot.split("x"))
    print(f"| weights | T | tree us | {sha} us | speed-up | tree GB/s (cached) |")
    print("|---|---|---|---|---|---|")
    for scheme in schemes:
        w = (torch.randn(n, k) / 16).bfloat16()
        data, scale = (w, None) if scheme == "bf16" else (lambda q: (q.data, q.scale))(quantize(w, scheme))
        for tokens in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(tokens, k).bfloat16()
            times = {"tree": [], "base": []}
            for r in range(args.repeats):
                for name, ext in (("tree", tree), ("base", base))[:: 1 if r % 2 else -1]:
                    t0 = time.perf_counter()
                    for _ in range(20):
                        ext.linear_fp32(x, data, True, scale)
                    times[name].append((time.perf_counter() - t0) / 20)
            t = {key: statistics.median(v) for key, v in times.items()}
            print(f"| {scheme} | {tokens} | {t['tree'] * 1e6:.0f} | {t['base'] * 1e6:.0f} | {t['base'] / t['tree']:.2f}x "
                  f"| {data.numel() * data.element_size() / t['tree'] / 1e9:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="HEAD", help="the git revision whose kernels are the baseline")
    ap.add_argument("--tokens", default="1,2,4,8,16,32")
    ap.add_argument("--schemes", default="bf16,int8", help="expert weights: bf16, int8, fp8")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=3584)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--dot-rows", type=int, default=2, help="vdpbf16ps tiles from this many rows (0: never)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--hot", default=None, metavar="NxK", help="time one cached [N, K] GEMM instead of the layer")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tree = cpu.extension()
    if tree is None:
        sys.exit("the native CPU kernels did not build on this machine; nothing to compare")
    with tempfile.TemporaryDirectory() as tmp:
        sha, base = build_revision(args.rev, Path(tmp))
    schemes = args.schemes.split(",")
    for ext in (tree, base):
        set_tiles(ext, args.dot_rows, schemes)
    print(f"{machine_key(args.threads)}; tiles vdpbf16ps from {args.dot_rows} rows\n")
    if args.hot:
        hot(tree, base, sha, schemes, args)
        return
    print(f"| experts | T | experts reached | tree ms | {sha} ms | speed-up | tree GB/s | read GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for scheme in schemes:
        copies = layers(args.hidden, args.inter, args.experts, scheme)
        expert_bytes = 3 * args.inter * args.hidden * (2 if scheme == "bf16" else 1)
        for tokens in (int(t) for t in args.tokens.split(",")):
            hiddens = [torch.randn(tokens, args.hidden).bfloat16() for _ in range(3)]
            times, reached = {"tree": [], "base": []}, []
            turn = 0
            for r in range(args.repeats):
                for name, ext in (("tree", tree), ("base", base))[:: 1 if r % 2 else -1]:  # alternate who is first
                    counts = torch.zeros(args.experts, dtype=torch.long)
                    layer = copies[turn % len(copies)]
                    turn += 1
                    t0 = time.perf_counter()
                    call(ext, hiddens[r % 3], layer, args.top_k, counts)
                    times[name].append(time.perf_counter() - t0)
                    reached.append(int((counts > 0).sum()))
            t = {k: statistics.median(v) for k, v in times.items()}
            hit = statistics.median(reached)
            print(f"| {scheme} | {tokens} | {hit:g} | {t['tree'] * 1e3:.2f} | {t['base'] * 1e3:.2f} "
                  f"| {t['base'] / t['tree']:.2f}x | {hit * expert_bytes / t['tree'] / 1e9:.1f} "
                  f"| {read_bandwidth(1) / 1e9:.1f} |")


if __name__ == "__main__":
    main()
