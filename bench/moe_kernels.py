"""Fused MoE benchmark: ours vs a naive per-expert loop, and vs torch._grouped_mm (CUDA) or the reference (CPU).

    .venv/bin/python bench/moe_kernels.py                                  # CUDA if present, else CPU
    .venv/bin/python bench/moe_kernels.py --shapes mini --m 1,16,128 --repeats 3 --out table.md

Ours is what the engine runs: on CUDA `fused_moe(backend="auto")`, the Triton kernels; on CPU the `cpu`
backend (native kernels for small expert groups, `kernels/cpu`) when it built here, else the torch backend,
with the torch backend also timed beside it. Routing is fixed
before timing (random router logits, top-2) and every method gets the same inputs. Per row it prints time,
TFLOP/s (6 * M * k * H * I flops), GB/s and % of the HBM roofline, where the bytes are the active experts'
weights plus the hidden states in and out, and the roofline is those bytes at the device's peak bandwidth.
CUDA times are triton.testing.do_bench medians (L2 flushed between runs), for eager calls and, for ours
and torch._grouped_mm, for replays of a CUDA graph (how an engine runs decode: no per-launch CPU cost);
CPU times are the best of `--repeats` interleaved rounds (the methods take turns, so load from other
processes hits them alike).

Quantized experts (`--quant none,int8,fp8`, issue 20): for M <= `--quant-max-m` the same inputs (hidden
states, routing) also run with the experts quantized per row from the same 16-bit weights (`kernels.quant`;
on CUDA the Triton kernels, eager and as a graph; no baselines): int8 as w8a16, fp8 twice, as w8a16
(`fp8_w8a16`) and as w8a8 (`fp8_w8a8`: activations quantized per token to fp8, fp8 tensor cores; what the
engine runs on compute capability >= 8.9). Their rows count the quantized bytes (8-bit values plus fp32
scales: `quant.expert_nbytes`), so "% HBM roofline" is of the bytes they move, and a second table puts them
beside the 16-bit kernel at each M: time, speedup, % of the quantized-bytes roofline.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from moe_kernels_tables import Row, format_quant_table, format_table

from moe_runtime.kernels import fused_moe, route
from moe_runtime.kernels.quant import SCHEMES, expert_nbytes, quantize
from moe_runtime.kernels.reference import RoutingResult

# Mixtral-8x7B-v0.1 (../shared/fixtures config.json) and the embedded `mini` preset.
SHAPES = {
    "mixtral": dict(H=4096, I=14336, E=8, k=2),
    "mini": dict(H=1024, I=3584, E=8, k=2),
}
ISSUE_M = (1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 4096)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANT = ("none", *SCHEMES)  # `--quant`: "none" = the 16-bit weights of --dtype, with every baseline

# Peak HBM bandwidth, bytes/s, by a substring of torch.cuda.get_device_name() (vendor datasheets).
PEAK_BANDWIDTH = {
    "H200": 4.8e12,
    "H100 NVL": 3.9e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,  # SXM5, HBM3
    "A100-SXM4-80GB": 2.039e12,
    "A100": 1.555e12,
}


def naive_loop(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, routing: RoutingResult
) -> torch.Tensor:
    """The baseline everyone writes first: for each expert, find its tokens, two GEMMs, index_add.
    hidden [T, H], w13 [E, 2I, H], w2 [E, H, I] -> [T, H]."""
    out = torch.zeros_like(hidden)
    for e in range(w13.shape[0]):
        token, kpos = torch.where(routing.ids == e)
        if token.numel() == 0:
            continue
        gate, up = F.linear(hidden[token], w13[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e]) * routing.weights[token, kpos, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


def grouped_mm_baseline(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, routing: RoutingResult):
    """torch._grouped_mm over tokens already sorted by expert (the sort is not timed, only the GEMMs and
    the SwiGLU between them). Returns the timed closure."""
    k = routing.top_k
    flat = routing.ids.flatten().long()
    order = torch.argsort(flat, stable=True)
    offs = torch.bincount(flat, minlength=w13.shape[0]).cumsum(0).to(torch.int32)
    rows = hidden[order // k].contiguous()  # [T*k, H] sorted by expert
    w13_t, w2_t = w13.transpose(1, 2), w2.transpose(1, 2)

    def run():
        gate, up = torch._grouped_mm(rows, w13_t, offs=offs).chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(gate) * up, w2_t, offs=offs)

    return run


def heuristic_tiles(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, routing: RoutingResult
) -> dict:
    """{"heuristic": ours with the untuned default tiles} when a tuned table exists for this shape, so the
    table shows what tuning bought; {} otherwise (ours already runs the heuristic)."""
    from moe_runtime.kernels.tile_config import (
        MoeShape,
        default_tile_config,
        device_name,
        load_table,
        table_path,
    )
    from moe_runtime.kernels.triton.fused_moe import fused_moe_triton_fp32

    E, two_i, _ = w13.shape
    shape = MoeShape(
        num_experts=E, intermediate=two_i // 2, dtype=hidden.dtype, device_name=device_name(hidden.device)
    )
    if not load_table(table_path(shape)):
        return {}
    cfg = default_tile_config(hidden.shape[0], routing.top_k, E)
    return {"heuristic": lambda: fused_moe_triton_fp32(hidden, w13, w2, routing, None, cfg).to(hidden.dtype)}


@dataclass(frozen=True)
class QuantFormat:
    scheme: str  # how the experts are stored: "none" or a key of quant.SCHEMES
    label: str  # the tables' "weights" cell
    # CUDA: the Triton MoE that runs it, fused_moe_triton_w8a8_fp32 (w8a8) or None: fused_moe_triton_fp32
    triton_moe: Callable[..., torch.Tensor] | None = None


def quant_formats(scheme: str, device: torch.device) -> list[QuantFormat]:
    """What `--quant scheme` times: fp8 experts on CUDA twice, w8a16 and w8a8 (the kernels refuse fp8 below
    compute capability 8.9, and those rows are skipped); anything else once (the CPU backends have no
    w8a8)."""
    if scheme == "fp8" and device.type == "cuda":
        from moe_runtime.kernels.triton.fused_moe import fused_moe_triton_w8a8_fp32

        return [QuantFormat("fp8", "fp8_w8a16"), QuantFormat("fp8", "fp8_w8a8", fused_moe_triton_w8a8_fp32)]
    return [QuantFormat(scheme, scheme)]


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_cpu(fns: dict[str, Callable[[], object]], repeats: int, clock: str = "wall") -> dict[str, float]:
    """Best of interleaved rounds after one warm-up, in ms: at least `repeats` rounds, and more while the
    rounds have taken under 4 s (cheap calls get many tries). clock="cpu" counts this process's CPU time
    instead of wall time, which other processes on a shared machine cannot inflate (use one thread, so
    that no CPU time is spent spinning at a barrier waiting for a descheduled sibling)."""
    now = CLOCKS[clock]
    best = {name: float("inf") for name in fns}
    for fn in fns.values():
        fn()
    rounds, start_all = 0, time.perf_counter()
    while rounds < repeats or (time.perf_counter() - start_all < 4.0 and rounds < 200):
        for name, fn in fns.items():
            start = now()
            fn()
            best[name] = min(best[name], (now() - start) * 1e3)
        rounds += 1
    return best


def cuda_graph(fn: Callable[[], object]) -> Callable[[], object]:
    """fn captured in a CUDA graph (after a warm-up that compiles and allocates outside the capture); the
    returned closure replays it. This is how a serving engine runs a decode step, without the per-launch
    CPU cost that dominates eager calls of a few hundred microseconds."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def with_graphs(
    fns: dict[str, Callable[[], object]], names: tuple[str, ...]
) -> dict[str, Callable[[], object]]:
    """fns plus "<name>_graph" for each of `names` whose capture works (routing is fixed, so it may)."""
    out = dict(fns)
    for name in names:
        if name in fns:
            try:
                out[f"{name}_graph"] = cuda_graph(fns[name])
            except RuntimeError as err:
                print(f"  {name}_graph: skipped ({str(err).splitlines()[0][:80]})")
    return out


def time_cuda(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    import triton.testing

    out = {}
    for name, fn in fns.items():
        try:
            out[name] = triton.testing.do_bench(fn, warmup=10, rep=max(repeats, 20))
        except (RuntimeError, NotImplementedError) as err:  # e.g. _grouped_mm unsupported on this GPU
            print(f"  {name}: skipped ({str(err).splitlines()[0][:80]})")
            out[name] = float("nan")
    return out


@dataclass(frozen=True)
class Timing:
    repeats: int  # CPU: minimum interleaved rounds; CUDA: do_bench budget in ms (at least 20)
    clock: str  # CPU only: "wall" or "cpu" (process CPU time)


def bench_one(shape_name: str, dtype_name: str, M: int, device: torch.device, timing: Timing, weights,
              fmt: QuantFormat = QuantFormat("none", "none")) -> Row:
    """One row: every method at M tokens. weights: (w13, w2) 16-bit, or QuantizedWeights of `fmt.scheme`."""
    quant = fmt.scheme
    s = SHAPES[shape_name]
    dtype = DTYPES[dtype_name]
    w13, w2 = weights
    g = torch.Generator().manual_seed(M)  # the same hidden states and routing for every weight format
    hidden = torch.randn(M, s["H"], generator=g).to(device, dtype)
    routing = route(torch.randn(M, s["E"], generator=g).to(device), s["k"])
    active = int(torch.unique(routing.ids).numel())
    elem = hidden.element_size()
    row = dict(shape=shape_name, dtype=dtype_name, weights=dtype_name if quant == "none" else fmt.label, M=M,
               flops=6.0 * M * s["k"] * s["H"] * s["I"],
               bytes=float(active * expert_nbytes(s["H"], s["I"], dtype, quant) + 2 * M * s["H"] * elem))
    if quant != "none":
        return Row(times_ms=time_quantized(hidden, w13, w2, routing, timing, fmt.triton_moe), **row)
    fns: dict[str, Callable[[], object]] = {
        "ours": lambda: fused_moe(hidden, w13, w2, routing),
        "naive": lambda: naive_loop(hidden, w13, w2, routing),
    }
    if device.type == "cuda":
        fns.update(heuristic_tiles(hidden, w13, w2, routing))
        try:
            fns["grouped_mm"] = grouped_mm_baseline(hidden, w13, w2, routing)
        except (RuntimeError, AttributeError) as err:
            print(f"  grouped_mm: skipped ({str(err).splitlines()[0][:80]})")
        times = time_cuda(with_graphs(fns, ("ours", "grouped_mm")), timing.repeats)
    else:
        from moe_runtime.kernels import cpu

        if cpu.available():  # the engine's CPU path for 16-bit weights (model.exact: false)
            fns["ours"] = lambda: fused_moe(hidden, w13, w2, routing, backend="cpu")
            fns["torch"] = lambda: fused_moe(hidden, w13, w2, routing, backend="torch")
        fns["reference"] = lambda: fused_moe(hidden, w13, w2, routing, backend="reference")
        times = time_cpu(fns, timing.repeats, timing.clock)
    return Row(times_ms=times, **row)


def time_quantized(hidden: torch.Tensor, q13, q2, routing: RoutingResult, timing: Timing,
                   triton_moe: Callable[..., torch.Tensor] | None = None) -> dict[str, float]:
    """Ours on quantized experts: the engine's kernels for them (CUDA: the Triton MoE `triton_moe`, None for
    fused_moe_triton_fp32 = w8a16, or fused_moe_triton_w8a8_fp32 = w8a8, eager and as a graph; CPU: the
    `cpu` backend when it built, else torch), no baselines."""
    if hidden.is_cuda:
        from moe_runtime.kernels.triton.fused_moe import fused_moe_triton_fp32

        moe = triton_moe or fused_moe_triton_fp32
        ours = {"ours": lambda: moe(hidden, q13, q2, routing).to(hidden.dtype)}
        try:
            ours["ours"]()
        except (RuntimeError, ValueError) as err:  # e.g. fp8 below compute capability 8.9
            print(f"  {q13.dtype}, {moe.__name__}: skipped ({str(err).splitlines()[0][:100]})")
            return {}
        return time_cuda(with_graphs(ours, ("ours",)), timing.repeats)
    from moe_runtime.kernels import cpu

    backend = "cpu" if cpu.available() else "torch"
    return time_cpu({"ours": lambda: fused_moe(hidden, q13, q2, routing, backend=backend)}, timing.repeats,
                    timing.clock)


def describe_device(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        import os
        import platform

        return (
            f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
            None,
        )
    name = torch.cuda.get_device_name(device)
    peak = next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)
    return f"{name} (peak HBM {peak / 1e12:.2f} TB/s)" if peak else name, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="mixtral,mini", help="comma list of " + ",".join(SHAPES))
    p.add_argument("--m", default=",".join(map(str, ISSUE_M)), help="comma list of token counts")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--repeats", type=int, default=3, help="CPU: rounds; CUDA: do_bench ms budget (>= 20)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--clock", default="wall", choices=list(CLOCKS), help="CPU only: wall or process CPU time")
    p.add_argument("--threads", type=int, default=None, help="CPU only: torch threads (default: torch's)")
    p.add_argument("--quant", default="none", help="comma list of expert weight formats: " + ",".join(QUANT))
    p.add_argument("--quant-max-m", type=int, default=16, help="quantized formats only at M <= this")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = p.parse_args()
    quants = args.quant.split(",")
    if unknown := set(quants) - set(QUANT):
        p.error(f"--quant {sorted(unknown)}: allowed {list(QUANT)}")

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    desc, peak_bw = describe_device(device)
    clock = f", {args.clock} clock" if device.type == "cpu" else ""
    header = f"fused MoE, {desc}{clock}, torch {torch.__version__}"
    print(header, flush=True)
    rows: list[Row] = []
    for shape_name in args.shapes.split(","):
        s = SHAPES[shape_name]
        g = torch.Generator(device=device).manual_seed(0)
        kw = dict(generator=g, dtype=DTYPES[args.dtype], device=device)
        w13 = torch.randn(s["E"], 2 * s["I"], s["H"], **kw) / s["H"] ** 0.5  # [E, 2I, H]
        w2 = torch.randn(s["E"], s["H"], s["I"], **kw) / s["I"] ** 0.5  # [E, H, I]
        weights = {q: (w13, w2) if q == "none" else (quantize(w13, q), quantize(w2, q)) for q in quants}
        for M in map(int, args.m.split(",")):
            for q in quants:
                if q != "none" and M > args.quant_max_m:
                    continue
                for fmt in quant_formats(q, device):
                    timing = Timing(args.repeats, args.clock)
                    row = bench_one(shape_name, args.dtype, M, device, timing, weights[q], fmt)
                    rows.append(row)
                    line = format_table([row], peak_bw).splitlines()[2:]
                    print(line[0] if line else f"  {shape_name} M={M} {fmt.label}: not measured", flush=True)
        del w13, w2, weights
    table = format_table(rows, peak_bw)
    quant_table = format_quant_table(rows, peak_bw)
    if quant_table:
        table += "\n\nQuantized experts vs 16-bit (same inputs, same mode):\n\n" + quant_table
    print("\n" + header + "\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(header + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
