"""GPU engine benchmark: decode and prefill throughput against the card's roofline, CUDA graphs on and off.

    python bench/gpu_engine.py                    # mini and the Mixtral-8x7B shape, on the GPU (gpu_check.sh)
    python bench/gpu_engine.py --models mini --batches 1,16 --graphs on --out engine_bench.md
    python bench/gpu_engine.py --device cpu --models tiny --batches 1,4 --steps 4 --prefill 2x64   # logic check

Both models are built from config.json alone with seeded random weights on the device
(`model.load_format: dummy`): `mini` from its preset, Mixtral-8x7B from configs/models/ (94 GB in bf16: one
H200; with less free memory the run keeps fewer layers and says so). Random routers pick experts about
uniformly, which is what a GPU holding every expert sees at batch >= 16 anyway.

Decode (each batch): B prompts of --prompt-len random tokens; once every request decodes, --steps steps are
timed (wall clock; each step ends with its one device-to-host copy, so the time is the GPU's too).
    bytes per step = the weights every step reads (all but the embeddings) + the experts that got a token
                     in that step (its router counts) + the KV cache it reads (every sequence's context)
    roofline %     = (bytes per step / step time) / the card's peak bandwidth (datasheet), and / the copy
                     bandwidth measured in this run
Prefill: --prefill NxP prompts (default 16 x 512) in one step, max_tokens 1, timed after a warm-up.
    model FLOPs    = 2 x (active weights per token) x tokens + 4 x L x H x Dh x (causal pairs)
    compute %      = model FLOP/s / the card's dense bf16 peak (datasheet), and / a bf16 GEMM measured here
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_runtime.config import ModelConfig, load_config
from moe_runtime.engine.sampling_params import SamplingParams
from moe_runtime.launch import build_engine
from moe_runtime.presets.configs import preset_config

ROOT = Path(__file__).resolve().parents[1]
MIXTRAL = ROOT / "configs" / "models" / "mixtral-8x7b-v0.1" / "config.json"
# Datasheet peaks by a substring of the device name: (HBM bytes/s, dense bf16 FLOP/s).
PEAKS = {"H200": (4.8e12, 989e12), "H100 NVL": (3.9e12, 835e12), "H100 PCIe": (2.0e12, 756e12),
         "H100": (3.35e12, 989e12), "A100": (2.0e12, 312e12)}


@dataclass
class Row:
    model: str
    graphs: str
    kind: str  # "decode B=..." or "prefill NxP"
    tokens_per_s: float
    ms_per_step: float
    gb_per_step: float  # decode: bytes read per step; prefill: model TFLOP per step
    achieved: float  # decode: GB/s; prefill: TFLOP/s
    pct_peak: float
    pct_measured: float


def config_dir(name: str, layers: int | None) -> Path:
    """A folder with config.json only: the preset's, or Mixtral-8x7B's (optionally fewer layers)."""
    hf = preset_config(name) if name != "mixtral" else json.loads(MIXTRAL.read_text())
    if layers is not None:
        hf["num_hidden_layers"] = layers
    out = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    (out / "config.json").write_text(json.dumps(hf))
    return out


def fitting_layers(cfg: ModelConfig, device: torch.device, reserve: float = 12e9) -> int | None:
    """None when every layer fits the free device memory (less `reserve` for KV cache and activations), else
    the most layers that do."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    per_layer = 2 * (3 * cfg.num_local_experts * cfg.hidden_size * cfg.intermediate_size
                     + 2 * cfg.hidden_size * (cfg.num_attention_heads + cfg.num_key_value_heads) * cfg.head_dim)
    rest = 2 * 2 * cfg.vocab_size * cfg.hidden_size
    fit = int((free - reserve - rest) // per_layer)
    return None if fit >= cfg.num_hidden_layers else max(1, fit)


def measured_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (bytes read + written), best of 5."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * src.numel() / best


def measured_flops(device: torch.device) -> float:
    """FLOP/s of an 8192^3 bf16 GEMM on random data, best of 5."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(6):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * 8192**3 / best


def weight_bytes(model) -> tuple[int, int]:
    """(bytes every decode step reads: all weights but the experts and the embeddings, one expert's bytes)."""
    experts = model.layers[0].block_sparse_moe.experts
    expert = (experts.w13[0].numel() + experts.w2[0].numel()) * experts.w13.element_size()
    dense = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if "experts." not in n and "embed_tokens" not in n)
    return dense, expert


def kv_bytes_per_token(cfg: ModelConfig, elem: int) -> int:
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem


def prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=gen).tolist()


def decode(engine, batch: int, args) -> tuple[float, float]:
    """(seconds per decode step, bytes read per step) for `batch` sequences."""
    model, cfg = engine.executor.model, engine.model_config
    dense, expert = weight_bytes(model)
    kv_token = kv_bytes_per_token(cfg, model.dtype.itemsize)
    params = SamplingParams(max_tokens=args.steps + 8, temperature=0.0, ignore_eos=True)
    ids = [f"d{batch}-{i}" for i in range(batch)]
    for rid, p in zip(ids, prompts(batch, args.prompt_len, cfg.vocab_size, seed=batch), strict=True):
        engine.add_request(rid, p, params)
    produced: dict[str, int] = {}
    while len(produced) < batch or min(produced.values()) < 2:  # prefill done, every request decoding
        for out in engine.step():
            produced[out.request_id] = len(out.token_ids)
    step_bytes = []
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
        counts = engine.make_stats().router_counts  # [L, E]
        step_bytes.append(dense + expert * int((counts > 0).sum()))
    elapsed = time.perf_counter() - t0
    context = batch * (args.prompt_len + 2 + args.steps / 2)  # mean tokens read per step, all sequences
    for rid in ids:
        engine.abort(rid)
    return elapsed / args.steps, sum(step_bytes) / len(step_bytes) + context * kv_token


def prefill(engine, n: int, length: int, seed: int) -> tuple[float, float]:
    """(seconds, model FLOPs) of one step prefilling n prompts of `length` tokens drawn with `seed`: each call
    needs its own seed, or the prefix cache (on by default) would serve a repeated prompt without computing it."""
    cfg = engine.model_config
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts(n, length, cfg.vocab_size, seed=seed)):
        engine.add_request(f"p{n}-{i}", p, params)
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    elapsed = time.perf_counter() - t0
    D, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    qkvo = 2 * D * (cfg.num_attention_heads + cfg.num_key_value_heads) * cfg.head_dim
    active = L * (qkvo + D * cfg.num_local_experts + cfg.num_experts_per_tok * 3 * D * I) + cfg.vocab_size * D / length
    pairs = n * length * (length + 1) / 2  # causal (query, key) pairs
    return elapsed, 2 * active * n * length + 4 * L * cfg.num_attention_heads * cfg.head_dim * pairs


def run_model(name: str, graphs: str, args, bw_peak: float, fl_peak: float, bw: float, fl: float) -> list[Row]:
    device = torch.device(args.device)
    layers = args.layers
    if name == "mixtral" and layers is None:
        layers = fitting_layers(ModelConfig.from_hf(json.loads(MIXTRAL.read_text())), device)
    label = name if layers is None else f"{name} ({layers} layers)"
    batches = [int(b) for b in args.batches.split(",")]
    n, length = (int(x) for x in args.prefill.split("x"))
    tokens = max(b * (args.prompt_len + args.steps + 16) for b in batches) + n * (length + 16)
    sets = [f"model.path={config_dir(name, layers)}", "model.load_format=dummy", f"model.device={args.device}",
            f"model.dtype={args.dtype}", f"engine.max_num_seqs={max(max(batches), n)}",
            f"engine.max_num_batched_tokens={max(n * length, max(batches))}",
            f"engine.cuda_graphs={graphs == 'on'}", f"engine.cuda_graph_max_batch={max(batches)}",
            f"cache.num_blocks={tokens // 16 + 64}", "engine.seed=0", *args.overrides]
    t0 = time.perf_counter()
    engine = build_engine(load_config(overrides=sets))
    print(f"{label}, graphs {graphs}: engine ready in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    try:
        decode(engine, batches[0], argparse.Namespace(**{**vars(args), "steps": 2}))  # warm-up (compiles)
        for batch in batches:
            step_s, step_bytes = decode(engine, batch, args)
            gbs = step_bytes / step_s
            rows.append(Row(label, graphs, f"decode B={batch}", batch / step_s, 1e3 * step_s, step_bytes / 1e9,
                            gbs / 1e9, 100 * gbs / bw_peak, 100 * gbs / bw))
            print(_line(rows[-1]), flush=True)
        prefill(engine, 2, 64, seed=999)  # warm-up
        seconds, flops = min((prefill(engine, n, length, seed=1000 + r) for r in range(2)), key=lambda r: r[0])
        rows.append(Row(label, graphs, f"prefill {n}x{length}", n * length / seconds, 1e3 * seconds, flops / 1e12,
                        flops / seconds / 1e12, 100 * flops / seconds / fl_peak, 100 * flops / seconds / fl))
        print(_line(rows[-1]), flush=True)
    finally:
        engine.shutdown()
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _line(r: Row) -> str:
    return (f"| {r.model} | {r.graphs} | {r.kind} | {r.tokens_per_s:,.0f} | {r.ms_per_step:.2f} | {r.gb_per_step:.3f} "
            f"| {r.achieved:,.0f} | {r.pct_peak:.0f}% | {r.pct_measured:.0f}% |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mini,mixtral", help="mini, tiny, mixtral (comma-separated)")
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--graphs", default="on,off")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per batch")
    ap.add_argument("--prefill", default="16x512", help="NxP: N prompts of P tokens in one step")
    ap.add_argument("--layers", type=int, default=None, help="Mixtral layers (default: all that fit)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--out", type=Path, default=None, help="also write the table as markdown")
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    bw_peak, fl_peak = next((v for k, v in PEAKS.items() if k in name), (float("nan"), float("nan")))
    bw, fl = measured_bandwidth(device), measured_flops(device)
    head = (f"{name}; torch {torch.__version__}; {args.dtype}; dummy weights; decode: prompts {args.prompt_len} "
            f"tokens, {args.steps} timed steps. Peaks: datasheet {bw_peak / 1e12:.2f} TB/s, {fl_peak / 1e12:.0f} "
            f"TFLOP/s; measured copy {bw / 1e12:.2f} TB/s, bf16 GEMM {fl / 1e12:.0f} TFLOP/s\n\n"
            "| model | graphs | step | tok/s | ms/step | GB/step (prefill: TFLOP) | GB/s (prefill: TFLOP/s) "
            "| % of datasheet peak | % of measured peak |\n|---|---|---|---|---|---|---|---|---|")
    print(head, flush=True)
    rows = []
    for model in args.models.split(","):
        for graphs in args.graphs.split(","):
            rows += run_model(model, graphs, args, bw_peak, fl_peak, bw, fl)
    if args.out:
        args.out.write_text(head + "\n" + "\n".join(_line(r) for r in rows) + "\n")


if __name__ == "__main__":
    main()
