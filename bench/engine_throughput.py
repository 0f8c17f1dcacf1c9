"""Engine throughput: our engine vs transformers' `generate`, same checkpoint, same process, same run.

    .venv/bin/python bench/engine_throughput.py                       # mini, batches 1, 16, 64
    .venv/bin/python bench/engine_throughput.py --batches 1,16 --repeats 3 --out table.md

Workload (issue 3): prompts of 128 random token ids, 64 new tokens, greedy, `ignore_eos`. Prefill tok/s is
prompt tokens / time until every request has its first token; decode tok/s is the remaining tokens / the
remaining time. Every run draws fresh prompts: the prefix cache (on by default) would serve a repeated
prompt without computing it (runs before 2026-12-05 repeated them, so "ours" prefill figures from their
second round on measured cache hits). transformers runs `generate` with its best CPU experts
implementation (`grouped_mm`), bf16; its prefill time is `generate(max_new_tokens=1)`, its decode time the
difference to the full run.

The bandwidth floor: decode is bound by reading weights. Bytes per decode step = the non-expert weights
plus, per layer, the experts that got at least one token in that step (from our router counts); floor
tok/s = batch * bandwidth / bytes. The read bandwidth is the faster of two torch streaming reads of a
512 MiB buffer that no cache holds (a `sum`, one stream; an fp32 `mv` over rows of 4096, which MKL reads
several rows at a time: up to ~20% faster on one core here), best of 2, measured just before each of our
runs; each row uses the best of its own measurements, so the floor follows the machine's state during
that row. Each measurement is repeated `--repeats` times, ours and theirs taking turns; the best time is
kept.

The compute floor: at batch 16 and beyond a CPU decode step can be bound by arithmetic instead. The peak is
the faster of a bf16 GEMM (oneDNN's AVX512-BF16 / AMX path where the CPU has it) and an fp32 GEMM (FMA),
[256, 4096] x [4096, 4096], with the run's threads, measured once; compute floor tok/s = peak / (2 x the
weights a token multiplies: the non-expert weights, the head, top-k experts per layer). The table gives ours
as a % of the lower of the two floors. The header names the CPU and its ISA flags (the plan of kernels the
engine measured on it is logged at start-up; `moe-runtime info` prints it).

Quantized experts: with `--set model.quantization=int8` (or fp8; and `--set model.quantize_dense=true` for
the dense projections too) a second engine of the same config with 16-bit weights runs in the same process,
taking turns with the quantized one, and a second table gives both engines' prefill and decode tok/s and
their ratio (the issue's target: int8 decode at batch 1 >= 1.7x bf16). Bytes per step count the quantized experts at their size (values and scales).

The native GEMM tiles: on a CPU with AVX512-BF16 the engine's plan picks, per row count, the AVX2 tiles or
the `vdpbf16ps` ones (kernels/cpu/dot_bf16.h). `--tiles-baseline` runs the same engine a second time per
round with the AVX2 tiles only (for bf16 and int8 weights), taking turns, and a table gives both and their
ratio.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_runtime.cli import env_defaults
from moe_runtime.config import load_config
from moe_runtime.engine.llm_engine import LLMEngine
from moe_runtime.engine.sampling_params import SamplingParams
from moe_runtime.kernels import cpu
from moe_runtime.kernels.cpu.dispatch import machine_key
from moe_runtime.kernels.quant import QuantizedWeight


@dataclass
class Timing:
    prefill_s: float
    decode_s: float
    bytes_per_step: float = 0.0  # weights read per decode step (ours only; from the router counts)


def ensure_checkpoint(path: Path, preset: str) -> Path:
    if not (path / "config.json").exists():
        from moe_runtime.presets.init_model import init_model

        print(f"creating the {preset} checkpoint in {path} (once)")
        init_model(preset, path, seed=0)
    return path


def read_bandwidth(repeats: int = 2) -> float:
    """Bytes/s of a streaming read of 512 MiB that no cache holds: the best of `repeats` rounds of a sum and
    of an fp32 matrix-vector product over the same buffer (the faster read is the stricter floor)."""
    buf = torch.ones(128 * 1024 * 1024, dtype=torch.float32)
    rows, v = buf.view(-1, 4096), torch.ones(4096)
    best = float("inf")
    for _ in range(repeats):
        for read in (buf.sum, lambda: torch.mv(rows, v)):
            t0 = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - t0)
    return buf.numel() * buf.element_size() / best


def compute_peak() -> tuple[float, float]:
    """(bf16, fp32) GEMM FLOP/s of [256, 4096] x [4096, 4096] with torch's threads, best of 3 each."""
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        a, b = torch.randn(256, 4096).to(dtype), torch.randn(4096, 4096).to(dtype)
        a @ b
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        out.append(2 * 256 * 4096 * 4096 / best)
    return out[0], out[1]


def flops_per_token(cfg) -> float:
    """2 x the weights one decoded token multiplies (attention, router, head, its top-k experts per layer)."""
    D, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    attn = D * (cfg.num_attention_heads + cfg.num_key_value_heads) * cfg.head_dim * 2
    return 2 * (L * (attn + D * cfg.num_local_experts + cfg.num_experts_per_tok * 3 * D * I) + cfg.vocab_size * D)


def make_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab, (length - 1,), generator=gen).tolist() for _ in range(batch)]


def weight_bytes(model) -> tuple[int, int]:
    """(bytes of the weights every step reads, bytes of one expert of one layer)."""
    experts = model.layers[0].block_sparse_moe.experts
    w13, w2 = experts.w13[0], experts.w2[0]
    if isinstance(w13, QuantizedWeight):
        expert = w13.nbytes() + w2.nbytes()
    else:
        expert = (w13.numel() + w2.numel()) * w13.element_size()
    dense = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if "w13" not in n and "w2" not in n and "embed_tokens" not in n)
    return dense, expert


def run_ours(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> Timing:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    dense, expert = weight_bytes(engine.executor.model)
    for i, p in enumerate(prompts):
        engine.add_request(f"bench-{i}", p, params)
    started = set()
    t0 = time.perf_counter()
    while len(started) < len(prompts):
        started.update(out.request_id for out in engine.step())
    t1 = time.perf_counter()
    step_bytes = []
    while engine.has_unfinished():
        engine.step()
        counts = engine.make_stats().router_counts  # [L, E]
        step_bytes.append(dense + expert * int((counts > 0).sum()))
    t2 = time.perf_counter()
    return Timing(t1 - t0, t2 - t1, sum(step_bytes) / max(1, len(step_bytes)))


def run_hf(model, prompts: list[list[int]], new_tokens: int) -> Timing:
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        t2 = time.perf_counter()
    assert out.shape[1] == ids.shape[1] + new_tokens
    return Timing(t1 - t0, (t2 - t1) - (t1 - t0))


def load_hf(model_dir: Path):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                     experts_implementation="grouped_mm")
        impl = "grouped_mm"
    except (TypeError, ValueError):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        impl = "default"
    return model.eval(), impl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path(env_defaults()["cache_dir"]) / "models" / "mini")
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-baseline", action="store_true", help="skip transformers (ours only)")
    ap.add_argument("--tiles-baseline", action="store_true",
                    help="also run ours with the AVX2 tiles only (AVX512-BF16 CPUs: the measured tiles' gain)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--out", type=Path, default=None, help="also write the table as markdown")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = ensure_checkpoint(args.model, args.preset)
    batches = [int(b) for b in args.batches.split(",")]
    sets = [f"model.path={model_dir}", "model.device=cpu", f"engine.max_num_seqs={max(batches)}", *args.overrides]
    cfg = load_config(overrides=sets)
    engine = LLMEngine(cfg)
    scheme = cfg.model.quantization
    sixteen = [*sets, "model.quantization=none", "model.quantize_dense=false"]
    base = LLMEngine(load_config(overrides=sixteen)) if scheme != "none" else None
    vocab = engine.model_config.vocab_size
    args.machine, args.peak = machine_key(), max(compute_peak())
    args.token_flops = flops_per_token(engine.model_config)
    hf, impl = (None, "-") if args.no_baseline else load_hf(model_dir)
    warm = make_prompts(2, 16, vocab, seed=99)
    run_ours(engine, warm, 4)
    if base is not None:
        run_ours(base, warm, 4)
    if hf is not None:
        run_hf(hf, warm, 4)
    setters = (cpu.dot_bf16_rows, cpu.dot_int8_rows, cpu.dot_fp8_rows)  # per weight format
    measured_tiles = [set_rows(0) for set_rows in setters]  # what the plans set (0: AVX2 tiles only)
    for set_rows, rows_from in zip(setters, measured_tiles, strict=True):
        set_rows(rows_from)
    tiles = args.tiles_baseline and max(measured_tiles) > 0
    if args.tiles_baseline and not tiles:
        print("--tiles-baseline: the plan runs the AVX2 tiles only on this CPU; nothing to compare", file=sys.stderr)
    rows, quant_rows, tile_rows = [], [], []
    seeds = itertools.count(1)  # fresh prompts for every run: the prefix cache would serve a repeated one
    for batch in batches:
        ours, theirs, sixteen, avx2, bandwidth = [], [], [], [], 0.0
        for r in range(args.repeats):
            gc.collect()
            bandwidth = max(bandwidth, read_bandwidth())
            ours.append(run_ours(engine, make_prompts(batch, args.prompt_len, vocab, next(seeds)), args.new_tokens))
            _progress(f"batch {batch} round {r + 1}: ours", ours[-1])
            if base is not None:
                gc.collect()
                sixteen.append(run_ours(base, make_prompts(batch, args.prompt_len, vocab, next(seeds)), args.new_tokens))
                _progress(f"batch {batch} round {r + 1}: ours, 16-bit experts", sixteen[-1])
            if tiles:
                gc.collect()
                for set_rows in setters:
                    set_rows(0)
                avx2.append(run_ours(engine, make_prompts(batch, args.prompt_len, vocab, next(seeds)), args.new_tokens))
                for set_rows, rows_from in zip(setters, measured_tiles, strict=True):
                    set_rows(rows_from)
                _progress(f"batch {batch} round {r + 1}: ours, AVX2 tiles", avx2[-1])
            if hf is not None:
                gc.collect()
                theirs.append(run_hf(hf, make_prompts(batch, args.prompt_len, vocab, next(seeds)), args.new_tokens))
                _progress(f"batch {batch} round {r + 1}: transformers", theirs[-1])
        rows.append(_row(batch, args, ours, theirs, bandwidth))
        if base is not None:
            quant_rows.append(_row(batch, args, ours, sixteen, bandwidth))
        if tiles:
            tile_rows.append(_row(batch, args, ours, avx2, bandwidth))
    _print(rows, impl, args)
    if base is not None:
        label = scheme + (" experts + dense" if cfg.model.quantize_dense else " experts")
        _print_versus(quant_rows, label, "16-bit", "quantized vs 16-bit weights, same engine config", args)
    if tiles:
        _print_versus(tile_rows, "measured tiles", "AVX2 tiles",
                      f"the measured native tiles (vdpbf16ps from {measured_tiles[0]} rows for bf16 weights, "
                      f"{measured_tiles[1]} for int8; 0: never) vs AVX2 only, same engine",
                      args)


def _progress(what: str, t: Timing) -> None:
    print(f"{what}: prefill {t.prefill_s:.2f} s, decode {t.decode_s:.2f} s", file=sys.stderr, flush=True)


def _row(batch, args, ours: list[Timing], theirs: list[Timing], bandwidth: float) -> dict:
    prompt_tokens, decode_tokens = batch * args.prompt_len, batch * (args.new_tokens - 1)
    o_pre = prompt_tokens / min(t.prefill_s for t in ours)
    o_dec = decode_tokens / min(t.decode_s for t in ours)
    step_bytes = sum(t.bytes_per_step for t in ours) / len(ours)
    floor = batch * bandwidth / step_bytes
    compute = args.peak / args.token_flops
    row = dict(batch=batch, o_pre=o_pre, o_dec=o_dec, floor=floor, gb=step_bytes / 1e9, bw=bandwidth / 1e9,
               compute=compute)
    if theirs:
        row.update(t_pre=prompt_tokens / min(t.prefill_s for t in theirs),
                   t_dec=decode_tokens / max(1e-9, min(t.decode_s for t in theirs)))
    return row


def _print(rows, impl, args) -> None:
    head = ("| batch | prefill tok/s ours | transformers | ratio | decode tok/s ours | transformers | ratio "
            "| GB/step | read GB/s | floor tok/s | compute floor tok/s | ours % of min(floors) |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        t_pre, t_dec = r.get("t_pre"), r.get("t_dec")
        lines.append(
            f"| {r['batch']} | {r['o_pre']:.0f} | {t_pre or 0:.0f} | {r['o_pre'] / t_pre if t_pre else 0:.2f}x "
            f"| {r['o_dec']:.1f} | {t_dec or 0:.1f} | {r['o_dec'] / t_dec if t_dec else 0:.2f}x "
            f"| {r['gb']:.2f} | {r['bw']:.1f} | {r['floor']:.0f} | {r['compute']:.0f} "
            f"| {100 * r['o_dec'] / min(r['floor'], r['compute']):.0f}% |"
        )
    info = (f"{args.machine}; compute peak {args.peak / 1e9:.0f} GFLOP/s\n"
            f"model {args.model.name}, prompts {args.prompt_len} tokens, {args.new_tokens} new, greedy; "
            f"threads {torch.get_num_threads()}; "
            f"transformers experts_implementation={impl}; best of {args.repeats}")
    text = "\n".join([info, "", *lines])
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def _print_versus(rows, ours: str, base: str, title: str, args) -> None:
    """Ours against another run of ours, taking turns in the same process (the `t_*` fields hold the other)."""
    lines = [f"\n{title}, same process, taking turns",
             f"| batch | prefill tok/s {ours} | {base} | ratio | decode tok/s {ours} | {base} | ratio |",
             "|" + "---|" * 7]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['o_pre']:.0f} | {r['t_pre']:.0f} | {r['o_pre'] / r['t_pre']:.2f}x "
                     f"| {r['o_dec']:.1f} | {r['t_dec']:.1f} | {r['o_dec'] / r['t_dec']:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with args.out.open("a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
