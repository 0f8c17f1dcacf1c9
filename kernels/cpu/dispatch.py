"""Which implementation of each hot CPU op runs, by row count: measured on this machine, not assumed.

The same CPU op has up to three implementations that round at the same points (each GEMM's result, once,
to the activation dtype) and differ only in speed, which depends on the chip:
    native  kernels/cpu: reads a 16-bit weight once for all rows, fp32 accumulation (AVX2)
    bf16    torch's 16-bit GEMM: oneDNN picks AVX512-BF16 or AMX where the CPU has them
    fp32    torch's fp32 GEMM on an fp32 copy of the weight (linears), or on weight chunks widened as they
            are read (experts)
On a 2-core AVX2 EPYC (no 16-bit GEMM instructions) torch's bf16 GEMM runs about row by row, so native
wins to ~32 rows and fp32 beyond; on a Zen 4 EPYC with AVX512-BF16, torch's bf16 GEMM wins from 4-8 rows
and fp32 never does (docs/benchmarks.md). So each op's plan is timed at start-up for the model's shapes,
per bucket of rows (1, 2, 4, ... the most the engine will send), and cached per machine (CPU model, ISA
flags, torch version, threads): the second start reads it.

A `RowPlan` answers "which implementation for n rows": the first bucket bound >= n.

The native kernels' GEMMs of bf16 weights have two tile kinds, chosen the same way: the AVX2 ones (each
weight widened to fp32, then FMA) and, on CPUs with AVX512-BF16, `vdpbf16ps` tiles (kernels/cpu/dot_bf16.h)
that multiply bf16 pairs without widening. Which wins from how many rows is timed first (`plan_dot_bf16`),
since every other native timing depends on it. GEMMs of int8 weights take the same two kinds (the int8
values widened to bf16 in registers for the `vdpbf16ps` ones) from a switch point of their own, timed on
the model's int8 expert shapes (`plan_dot_8bit`): the widening costs differ, so do the row counts where they
win; float8_e4m3fn experts have a switch point of their own the same way.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

LINEAR_CHOICES = ("native", "bf16", "fp32")
EXPERT_CHOICES = ("native", "bf16", "fp32")
DOT_CHOICES = ("avx2", "bf16dp")  # the native GEMM tiles for bf16 or int8 weights (kernels/cpu/dot_bf16.h)
NATIVE_MAX_ROWS = 64  # the native kernels take at most this many rows (kernels/cpu/small_m_tiles.h)
# A measurement's weights: copies cycled through, at least this many bytes in all, so that small-row GEMMs
# read them from memory (as in a decode step, which streams every weight once) and not from the caches.
COLD_BYTES = 96 << 20
# A plan's name for the format of 8-bit weights, by storage dtype (16-bit weights: "none")
WEIGHT_FORMATS = {torch.int8: "int8", torch.float8_e4m3fn: "fp8"}


@dataclass(frozen=True)
class RowPlan:
    """`choices[i]` runs batches of up to `bounds[i]` rows; beyond the last bound, the last choice.

    >>> plan = RowPlan(bounds=(1, 2, 4, 8), choices=("native", "native", "bf16", "bf16"))
    >>> plan.choice(1), plan.choice(3), plan.choice(100)
    ('native', 'bf16', 'bf16')
    """

    bounds: tuple[int, ...]
    choices: tuple[str, ...]

    def choice(self, rows: int) -> str:
        i = bisect.bisect_left(self.bounds, rows)
        return self.choices[min(i, len(self.choices) - 1)]

    def max_rows(self, choice: str) -> int:
        """The most rows this plan runs with `choice` (0 if never)."""
        return max((b for b, c in zip(self.bounds, self.choices, strict=True) if c == choice), default=0)


@dataclass(frozen=True)
class ChunkPlan:
    """The prompt tokens a step prefills (engine/prefill_chunk.py): the choice and the figures it came from.

    >>> ChunkPlan(chunk=64, limit=2048, sizes=(16, 32, 64, 128), tokens_per_s=(90.0, 160.0, 290.5, 300.0)).summary()
    '64 tokens (prefill tok/s by chunk: 16: 90, 32: 160, 64: 290, 128: 300; ladder up to 2048)'
    """

    chunk: int  # the choice: one of `sizes`
    limit: int  # the most tokens the ladder could reach (cap, KV cache, context): a new limit measures again
    sizes: tuple[int, ...]  # chunk sizes measured, ascending (the ladder, maybe stopped early)
    tokens_per_s: tuple[float, ...]  # prefill throughput of a chunk of each size: new tokens / seconds

    def summary(self) -> str:
        figures = ", ".join(f"{n}: {t:.0f}" for n, t in zip(self.sizes, self.tokens_per_s, strict=True))
        return f"{self.chunk} tokens (prefill tok/s by chunk: {figures}; ladder up to {self.limit})"


@dataclass(frozen=True)
class CpuPlan:
    """The measured plans of one model on one machine."""

    machine: str  # CPU model, ISA flags, torch version, threads: what the timings hold for
    linear: dict[str, RowPlan] = field(default_factory=dict)  # "NxK" weight shape -> plan over rows
    expert: RowPlan | None = None  # one expert's SwiGLU MLP, over its group's rows
    decode: RowPlan | None = None  # a whole decode step: "native" calls or "eager" ops, over sequences
    # The native GEMM tiles for bf16 weights, over rows of x (AVX512-BF16 CPUs, bf16 models; else None)
    dot: RowPlan | None = None
    # The same for int8 weights (bf16 models with int8 experts or dense projections; else None)
    dot_int8: RowPlan | None = None
    # The same for float8_e4m3fn experts (bf16 models with fp8 experts; else None)
    dot_fp8: RowPlan | None = None
    # Prompt tokens per step (`engine.prefill_chunk: auto`), measured on the loaded model; None (and in plan
    # files written before it existed): measured at the next engine start.
    prefill: ChunkPlan | None = None

    def linear_plan(self, w) -> RowPlan | None:
        """The plan for weight w (a tensor or a `QuantizedWeight`: its shape and format)."""
        return self.linear.get(weight_key(w.shape, WEIGHT_FORMATS.get(w.dtype, "none")))

    def describe(self) -> str:
        """One line per op: which implementation runs up to how many rows."""
        lines = [f"machine: {self.machine}"]
        for name, plan in [("native bf16 tiles", self.dot), ("native int8 tiles", self.dot_int8),
                           ("native fp8 tiles", self.dot_fp8),
                           *(("linear " + k, p) for k, p in self.linear.items()),
                           ("expert", self.expert), ("decode step", self.decode)]:
            if plan is not None:
                lines.append(f"{name}: " + ", ".join(ranges(plan)))
        if self.prefill is not None:
            lines.append(f"prefill chunk: {self.prefill.summary()}")
        return "\n".join(lines)


def dot_min_rows(plan: RowPlan | None) -> int:
    """The fewest rows from which the `vdpbf16ps` tiles run (0: never): where the buckets that chose
    "bf16dp" run on to the last one. A bucket of AVX2 between them keeps the AVX2 tiles below it: the
    kernels take one switch point, and the rows past the last bucket follow the last choice.

    >>> p = RowPlan((1, 2, 4, 8, 16, 32, 64), ("avx2", "avx2", "bf16dp", "avx2", "bf16dp", "bf16dp", "bf16dp"))
    >>> dot_min_rows(p), dot_min_rows(RowPlan((1, 2), ("avx2", "avx2"))), dot_min_rows(None)
    (9, 0, 0)
    """
    if plan is None:
        return 0
    rows = 0
    for lo, choice in zip((0, *plan.bounds), plan.choices, strict=False):
        if choice != "bf16dp":
            rows = 0
        elif rows == 0:
            rows = lo + 1
    return rows


def shape_key(shape: tuple[int, ...] | torch.Size) -> str:
    return "x".join(str(d) for d in shape)


def weight_key(shape: tuple[int, ...] | torch.Size, weights: str = "none") -> str:
    """A linear plan's key: the weight's shape, and its format when 8-bit ("int8", "fp8").

    >>> weight_key((1536, 1024)), weight_key((1536, 1024), "int8")
    ('1536x1024', '1536x1024 int8')
    """
    return shape_key(shape) + ("" if weights == "none" else f" {weights}")


def buckets(max_rows: int) -> tuple[int, ...]:
    """Row counts measured: powers of two up to max_rows (and max_rows itself).

    >>> buckets(48)
    (1, 2, 4, 8, 16, 32, 48)
    """
    out, b = [], 1
    while b < max_rows:
        out.append(b)
        b *= 2
    return (*out, max_rows)


def machine_key(threads: int | None = None) -> str:
    """What a plan is valid for: CPU model name, the ISA flags that pick kernels, torch, threads."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    isa = sorted(flags & {"avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"})
    threads = threads if threads is not None else torch.get_num_threads()
    return f"{model} [{' '.join(isa)}] torch {torch.__version__} threads {threads}"


# ---------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------
def best_times(candidates: dict[str, Callable[[], object]], rounds: int = 3) -> dict[str, float]:
    """Seconds of each candidate: the best of `rounds`, the candidates taking turns (a noisy neighbour then
    slows them alike), after one untimed call each."""
    for fn in candidates.values():
        fn()
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(rounds):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def _cold_copies(shape: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    n = max(1, min(8, -(-COLD_BYTES // nbytes)))
    first = (torch.randn(shape) / 16).to(dtype)  # values do not change GEMM times (no denormals here)
    return [first, *(first.clone() for _ in range(n - 1))]


# A candidate replaces the previous bucket's choice only when at least this much faster: measurement noise
# on a shared host must not make the plan flip back and forth between neighbouring row counts.
HYSTERESIS = 0.05


def pick(times: dict[str, float], previous: str | None) -> str:
    """The fastest candidate, unless the previous bucket's choice is within HYSTERESIS of it.

    >>> pick({"bf16": 1.0, "native": 1.03}, previous="native"), pick({"bf16": 1.0, "native": 1.2}, "native")
    ('native', 'bf16')
    """
    best = min(times, key=times.get)
    if previous in times and times[previous] <= times[best] * (1 + HYSTERESIS):
        return previous
    return best


class _Cycle:
    """Calls fn(weights) with the next of several weight copies each time, from copy `start` + 1 on."""

    def __init__(self, copies: list, fn: Callable, start: int = 0):
        self.copies, self.fn, self.i = copies, fn, start

    def __call__(self):
        self.i = (self.i + 1) % len(self.copies)
        return self.fn(self.copies[self.i])


def _apart(cands: dict[str, tuple[list, Callable]]) -> dict[str, _Cycle]:
    """One `_Cycle` per candidate (name -> (copies, fn)), those that cycle through the same copies starting
    evenly apart. Candidates take turns (`best_times`), and one that reads the copy another has just read
    finds part of it in the last-level cache: one int8 expert of mini is 11 MB of the Zen 4 EPYC's 32 MB L3,
    and with both on the same copy the tile plan at 1 row went to whichever candidate ran second, by ~20%,
    in either order (2 threads, 2026-12-05)."""
    sharing: dict[int, list[str]] = {}
    for name, (copies, _) in cands.items():
        sharing.setdefault(id(copies), []).append(name)
    out = {}
    for names in sharing.values():
        for j, name in enumerate(names):
            copies, fn = cands[name]
            out[name] = _Cycle(copies, fn, start=j * len(copies) // len(names))
    return {name: out[name] for name in cands}


def plan_linear(n: int, k: int, dtype: torch.dtype, max_rows: int, native: bool, weights: str = "none") -> RowPlan:
    """The fastest of native / bf16 / fp32 for x [rows, k] @ w[n, k]^T, per bucket of rows, activations in
    `dtype`. weights: "none" (16-bit w in `dtype`; `fp32` is a kept fp32 copy) or "int8" / "fp8"
    (kernels/quant.py; `bf16` / `fp32` dequantize w to that dtype at each call, as kernels/linear.py
    `CpuLinear` runs them)."""
    from moe_runtime.kernels import cpu
    from moe_runtime.kernels.quant import QuantizedWeight, quantize

    copies = _cold_copies((n, k), dtype)
    if weights != "none":  # as many 8-bit copies, so twice the bytes-per-copy margin over the caches
        copies = wide = [quantize(w, weights) for w in copies]
    else:
        wide = [w.float() for w in copies[:2]]  # the fp32 copy is 2x the bytes: fewer copies keep it comparable

    def as_(w, dtype: torch.dtype) -> torch.Tensor:  # an 8-bit weight dequantized now; a tensor as it is
        return cpu.dequantize(w, dtype) if isinstance(w, QuantizedWeight) else w

    choices = []
    for rows in buckets(max_rows):
        x = torch.randn(rows, k).to(dtype)
        cands = {"bf16": (copies, lambda w, x=x: F.linear(x, as_(w, x.dtype))),
                 "fp32": (wide, lambda w, x=x: F.linear(x.float(), as_(w, torch.float32)))}
        if native and rows <= NATIVE_MAX_ROWS:
            cands["native"] = (copies, lambda w, x=x: cpu.linear(x, w))
        choices.append(pick(best_times(_apart(cands)), choices[-1] if choices else None))
    return RowPlan(buckets(max_rows), tuple(choices))


def plan_dot_bf16(hidden: int, inter: int, max_rows: int) -> RowPlan:
    """The faster of the native GEMM's AVX2 and `vdpbf16ps` tiles (kernels/cpu/dot_bf16.h) per bucket of
    rows, on one expert's bf16 weights (w13 [2 * inter, hidden] then w2 [hidden, inter]: the shapes most of
    a decode step's bytes have). Needs `cpu.has_avx512_bf16()`; leaves the tiles as it found them."""
    from moe_runtime.kernels import cpu

    pairs = list(zip(_cold_copies((2 * inter, hidden), torch.bfloat16),
                     _cold_copies((hidden, inter), torch.bfloat16), strict=False))
    return _plan_tiles(pairs, cpu.dot_bf16_rows, max_rows)


def plan_dot_8bit(scheme: str, shapes: list[tuple[int, int]], max_rows: int) -> RowPlan:
    """`plan_dot_bf16` for GEMMs of 8-bit weights, `scheme` "int8" or "fp8" (each its own switch point,
    `cpu.dot_int8_rows` / `cpu.dot_fp8_rows`: their widening costs differ), on weights of `shapes`
    [(N, K), ...] run one after the other with bf16 x (the engine passes one expert's w13 and w2). Needs
    `cpu.has_avx512_bf16()`; leaves the tiles as it found them."""
    from moe_runtime.kernels import cpu
    from moe_runtime.kernels.quant import quantize

    set_rows = {"int8": cpu.dot_int8_rows, "fp8": cpu.dot_fp8_rows}[scheme]
    # as many 8-bit copies as bf16 ones would be, so twice the bytes-per-copy margin over the caches
    groups = list(zip(*([quantize(w, scheme) for w in _cold_copies(s, torch.bfloat16)] for s in shapes),
                      strict=False))
    return _plan_tiles(groups, set_rows, max_rows)


def _plan_tiles(groups: list[tuple], set_rows: Callable[[int], int], max_rows: int) -> RowPlan:
    """Per bucket of rows, the faster of the AVX2 tiles and the `vdpbf16ps` ones (`set_rows`: the switch
    point of these weights' type, put back as found) on a group of weights [N, K] (copies cycled through,
    `_apart`), each multiplied by bf16 x [rows, K] in turn."""
    from moe_runtime.kernels import cpu

    before = set_rows(0)
    try:
        choices = []
        for rows in buckets(min(max_rows, NATIVE_MAX_ROWS)):
            xs = [torch.randn(rows, w.shape[1]).bfloat16() for w in groups[0]]

            def run(ws, threshold: int, xs=xs):
                set_rows(threshold)
                for x, w in zip(xs, ws, strict=True):
                    cpu.linear(x, w)

            cands = {"avx2": (groups, lambda ws: run(ws, 0)), "bf16dp": (groups, lambda ws: run(ws, 1))}
            choices.append(pick(best_times(_apart(cands)), choices[-1] if choices else None))
    finally:
        set_rows(before)
    return RowPlan(buckets(min(max_rows, NATIVE_MAX_ROWS)), tuple(choices))


def plan_expert(hidden: int, inter: int, dtype: torch.dtype, max_rows: int, native: bool,
                weights: str = "none") -> RowPlan:
    """The fastest of native / bf16 / fp32 for one expert's SwiGLU MLP over a group of rows, activations in
    `dtype`. weights: "none" (16-bit experts in `dtype`) or "int8" / "fp8" (kernels/quant.py; then `bf16` is
    the expert dequantized to `dtype` and torch's GEMMs, `fp32` dequantized chunk by chunk, as
    kernels/cpu/moe.py runs them)."""
    from moe_runtime.kernels import cpu
    from moe_runtime.kernels.cpu.moe import _expert_mlp_dequantized_native, expert_mlp_16bit, expert_mlp_fp32
    from moe_runtime.kernels.quant import quantize

    w13s, w2s = _cold_copies((2 * inter, hidden), dtype), _cold_copies((hidden, inter), dtype)
    pairs = list(zip(w13s, w2s, strict=False))
    sixteen = expert_mlp_16bit
    if weights != "none":  # as many 8-bit copies, so twice the bytes-per-copy margin over the caches
        pairs = [(quantize(a, weights), quantize(b, weights)) for a, b in pairs]
        sixteen = _expert_mlp_dequantized_native
    choices = []
    for rows in buckets(max_rows):
        x = torch.randn(rows, hidden).to(dtype) / 4
        cands = {"bf16": (pairs, lambda p, x=x: sixteen(x, *p)),
                 "fp32": (pairs, lambda p, x=x: expert_mlp_fp32(x, *p))}
        if native and rows <= NATIVE_MAX_ROWS:
            cands["native"] = (pairs, lambda p, x=x: cpu.expert_mlp(x, *p))
        choices.append(pick(best_times(_apart(cands)), choices[-1] if choices else None))
    return RowPlan(buckets(max_rows), tuple(choices))


def ranges(plan: RowPlan) -> list[str]:
    out, lo = [], 1
    for bound, choice in zip(plan.bounds, plan.choices, strict=True):
        if out and out[-1][0] == choice:
            out[-1][2] = bound
        else:
            out.append([choice, lo, bound])
        lo = bound + 1
    return [f"{c} {a}-{b}" if a != b else f"{c} {a}" for c, a, b in out] + [f"(beyond {plan.bounds[-1]}: {plan.choices[-1]})"]
