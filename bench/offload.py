"""Expert offloading: tokens/s and cache behaviour against the all-resident run, same checkpoint, same process.

    .venv/bin/python bench/offload.py                                   # tiny-trained and mini, CPU, mmap tier
    .venv/bin/python bench/offload.py --models tiny-trained --batches 1 --miss auto --prefetch on,off
    .venv/bin/python bench/offload.py --device cuda --tier pinned        # on a lent GPU (bench/gpu_check.sh)

Workload: B prompts (Python snippets through the model's tokenizer), greedy, `--tokens` new tokens each,
through the engine (KV cache, batching). For each resident budget S in {E, 3E/4, E/2, E/4} x prefetch x
miss policy it reports tokens/s (prefill + decode) of both engines, their ratio in wall time and in process
CPU time (steadier on a shared machine), the hit rate, prefetch accuracy (guessed experts used / guessed),
seconds stalled on weights and MB moved per run, and whether the greedy tokens equal the all-resident
run's. Each configuration is timed `--repeats` times, each right after the all-resident engine, best kept.
With `--quantized int8` (or fp8) it compares 16-bit and 8-bit experts at the same device budget in bytes
instead (the 8-bit engine holds about twice the experts): tok/s, hit rate and MB moved of each.
With `--rss` (CPU, mmap tier, E/4, mini) a fresh process also reports peak RSS (VmHWM) against the issue's
bound: non-expert weights + resident experts + KV + 300 MB, and the interpreter floor (no weights).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from moe_runtime.cli import env_defaults
from moe_runtime.config import load_config
from moe_runtime.engine.llm_engine import LLMEngine
from moe_runtime.engine.sampling_params import SamplingParams

SNIPPETS = (
    "def __init__(self, name, value=None):\n    self.name = name\n",
    "import os\nimport sys\n\nfor path in sys.argv[1:]:\n    print(os.path",
    "class Error(Exception):\n    \"\"\"Base class for errors in this module.\"\"\"\n",
    "    if not isinstance(key, str):\n        raise TypeError(f\"key must be",
    "with open(filename, 'rb') as f:\n    data = f.read()\n    return",
    "    try:\n        return self._cache[key]\n    except KeyError:\n",
)
MB = 1024 * 1024


def model_dir(name: str, cache: Path) -> Path:
    path = cache / name
    if not (path / "config.json").exists():
        if name == "tiny-trained":
            from moe_runtime.presets.tiny_trained import write_tiny_trained

            write_tiny_trained(path)
        else:
            from moe_runtime.presets.init_model import init_model

            print(f"creating {name} checkpoint in {path} ...", flush=True)
            init_model(name, path, seed=0)
    return path


def make_engine(path: Path, args, batch: int, offload: list[str]) -> LLMEngine:
    blocks = batch * ((64 + args.tokens) // 16 + 2)  # enough KV for every request at once, no more
    sets = [f"model.path={path}", f"model.device={args.device}", f"model.dtype={args.dtype}",
            f"cache.num_blocks={blocks}", f"engine.max_num_seqs={batch}", f"engine.num_threads={args.threads}",
            "cache.prefix_caching=false", *offload]  # every timed run repeats the snippets: compute them each time
    return LLMEngine(load_config(overrides=sets))


def warm(engine: LLMEngine, prompts: list[list[int]]) -> None:
    """A short generate (allocator, caches, store slots), then zeroed store counters."""
    engine.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    if engine.executor.expert_store is not None:
        engine.executor.expert_store.reset_stats()


def timed(engine: LLMEngine, prompts: list[list[int]], tokens: int) -> tuple[float, float, list[list[int]]]:
    """(wall s, process CPU s, greedy token ids) of one generate."""
    cuda = engine.executor.model.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    outs = engine.generate(prompts, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu, [o.token_ids for o in outs]


def bench_model(name: str, args, cache: Path) -> list[str]:
    """Each configuration is timed `repeats` times, each time right after the all-resident engine, so both
    see the same load on a shared machine; the best of each is kept and their ratio reported."""
    path = model_dir(name, cache)
    E = json.loads((path / "config.json").read_text())["num_local_experts"]
    budgets = sorted({max(2, round(E * f)) for f in args.fractions}, reverse=True)
    rows = []
    for batch in args.batches:
        base = make_engine(path, args, batch, [])
        prompts = [base.tokenizer.encode(SNIPPETS[i % len(SNIPPETS)]) for i in range(batch)]
        warm(base, prompts)
        n = batch * args.tokens
        for S in budgets:
            for prefetch in args.prefetch:
                for miss in args.miss:
                    offload = ["offload.enabled=true", f"offload.resident_experts_per_layer={S}",
                               f"offload.prefetch={prefetch == 'on'}", f"offload.miss={miss}",
                               f"offload.host_tier={args.tier}", f"offload.policy={args.policy}"]
                    engine = make_engine(path, args, batch, offload)
                    warm(engine, prompts)
                    b_wall = b_cpu = o_wall = o_cpu = float("inf")
                    for _ in range(args.repeats):
                        w, c, base_tokens = timed(base, prompts, args.tokens)
                        b_wall, b_cpu = min(b_wall, w), min(b_cpu, c)
                        w, c, tokens = timed(engine, prompts, args.tokens)
                        o_wall, o_cpu = min(o_wall, w), min(o_cpu, c)
                    store = engine.executor.expert_store
                    st = store.stats()
                    store.close()
                    engine.shutdown()
                    acc = f"{st.prefetch_accuracy:.2f}" if prefetch == "on" else "-"
                    rows.append(
                        f"| {name} | {batch} | {S}/{E} | {prefetch} | {miss} | {n / o_wall:.1f} | {n / b_wall:.1f} "
                        f"| {b_wall / o_wall:.2f} | {b_cpu / o_cpu:.2f} | {st.hit_rate:.2f} | {acc} "
                        f"| {st.stall_s / args.repeats:.3f} | {st.bytes_moved / MB / args.repeats:.0f} "
                        f"| {'yes' if tokens == base_tokens else 'NO'} |")
                    print(rows[-1], flush=True)
        base.shutdown()
    return rows


def bench_quantized(name: str, args, cache: Path) -> list[str]:
    """16-bit against `args.quantized` experts (and with `--quantize-dense` dense projections) at the same
    device budget in bytes: S 16-bit experts per layer (S in the budgets of `--fractions`), i.e.
    `offload.device_memory_bytes` = S x layers x bytes of a 16-bit expert, which buys the 8-bit engine about
    2S slots. Each configuration is timed `repeats` times, the two engines taking turns; best kept."""
    from moe_runtime.checkpoint.layout import expert_bytes, resolve_dtype
    from moe_runtime.checkpoint.loader import read_config

    path = model_dir(name, cache)
    cfg = read_config(path)
    E, L = cfg.num_local_experts, len(cfg.moe_layers)
    sixteen = expert_bytes(cfg, resolve_dtype(args.dtype, cfg))
    quant = [f"model.quantization={args.quantized}", f"model.quantize_dense={args.quantize_dense}"]
    rows = []
    for batch in args.batches:
        for S in sorted({max(2, round(E * f)) for f in args.fractions}, reverse=True):
            budget = S * L * sixteen
            offload = ["offload.enabled=true", f"offload.device_memory_bytes={budget}", "offload.miss=fetch",
                       f"offload.prefetch={args.prefetch[0] == 'on'}", f"offload.host_tier={args.tier}",
                       f"offload.policy={args.policy}"]
            engines = [make_engine(path, args, batch, offload), make_engine(path, args, batch, [*offload, *quant])]
            prompts = [engines[0].tokenizer.encode(SNIPPETS[i % len(SNIPPETS)]) for i in range(batch)]
            best = [float("inf"), float("inf")]
            for engine in engines:
                warm(engine, prompts)
            for _ in range(args.repeats):
                for i, engine in enumerate(engines):
                    best[i] = min(best[i], timed(engine, prompts, args.tokens)[0])
            stats, slots = [], []
            for engine in engines:
                store = engine.executor.expert_store
                stats.append(store.stats())
                slots.append(next(iter(store.layers.values())).num_slots)
                store.close()
                engine.shutdown()
            n = batch * args.tokens
            rows.append(f"| {name} | {batch} | {budget / MB:.0f} | {slots[0]}/{E} | {slots[1]}/{E} "
                        f"| {n / best[0]:.1f} | {n / best[1]:.1f} | {best[0] / best[1]:.2f}x "
                        f"| {stats[0].hit_rate:.2f} | {stats[1].hit_rate:.2f} "
                        f"| {stats[0].bytes_moved / MB / args.repeats:.0f} | {stats[1].bytes_moved / MB / args.repeats:.0f} |")
            print(rows[-1], flush=True)
    return rows


RSS_PROBE = r"""
import json, sys, torch
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
sys.path.insert(0, sys.argv[4])
from offload import make_engine, timed, warm, SNIPPETS
import argparse
args = argparse.Namespace(device="cpu", dtype="auto", threads=1, tokens=int(sys.argv[3]))
path, S = sys.argv[1], int(sys.argv[2])
if S == 0:  # the floor: imports and the model skeleton on the meta device, no weights
    from moe_runtime.config import ModelConfig
    from moe_runtime.model.mixtral import MixtralForCausalLM
    with torch.device("meta"):
        MixtralForCausalLM(ModelConfig.from_pretrained(path))
    print(json.dumps({"hwm": hwm()})); sys.exit(0)
engine = make_engine(path, args, 1, ["offload.enabled=true", f"offload.resident_experts_per_layer={S}",
                                     "offload.host_tier=mmap", "offload.miss=fetch"])
prompts = [engine.tokenizer.encode(SNIPPETS[0])]
warm(engine, prompts)
timed(engine, prompts, args.tokens)
model, store = engine.executor.model, engine.executor.expert_store
nonexpert = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".w13" not in n and ".w2" not in n)
# the engine keeps fp32 copies of 16-bit attention/head weights on CPU (MixtralForCausalLM.keep_fp32_copies)
nonexpert += sum(m.weight_fp32.numel() * 4 for m in model.modules() if getattr(m, "weight_fp32", None) is not None)
kv = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in engine.executor.runner.kv_caches)
print(json.dumps({"hwm": hwm(), "nonexpert": nonexpert, "resident": store.device_bytes(), "kv": kv,
                  "hit_rate": store.stats().hit_rate}))
"""


def rss_rows(name: str, args, cache: Path) -> list[str]:
    path = model_dir(name, cache)
    E = json.loads((path / "config.json").read_text())["num_local_experts"]
    here = str(Path(__file__).resolve().parent)

    def probe(S: int) -> dict:
        out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(path), str(S), str(args.tokens), here],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    floor, p = probe(0)["hwm"], probe(max(2, E // 4))
    bound = p["nonexpert"] + p["resident"] + p["kv"] + 300 * MB
    held = p["nonexpert"] + p["resident"] + p["kv"]
    return [f"| {name} | {max(2, E // 4)}/{E} | {p['hwm'] / MB:.0f} | {bound / MB:.0f} | {floor / MB:.0f} "
            f"| {p['nonexpert'] / MB:.0f} | {p['resident'] / MB:.0f} | {p['kv'] / MB:.1f} "
            f"| {'yes' if p['hwm'] <= bound else 'no'} | {(p['hwm'] - floor - held) / MB:.0f} |"]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores visible)"
    return platform.processor() or "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description="expert offloading vs all-resident")
    ap.add_argument("--models", default="tiny-trained,mini")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tier", default=None, help="pinned | mmap (default: mmap on CPU, pinned on CUDA)")
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--fractions", default="1,0.75,0.5,0.25")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--miss", default="fetch,host_compute,auto")
    ap.add_argument("--prefetch", default="on,off")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (and of the baseline)")
    ap.add_argument("--rss", action="store_true", help="also measure peak RSS on mini (mmap, E/4) in a subprocess")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown tables here too")
    ap.add_argument("--quantized", default=None, metavar="int8|fp8",
                    help="instead: 16-bit vs 8-bit experts at the same device budget in bytes (miss: fetch)")
    ap.add_argument("--quantize-dense", action="store_true", help="with --quantized: dense projections too")
    args = ap.parse_args()
    args.tier = args.tier or ("pinned" if args.device.startswith("cuda") else "mmap")
    args.fractions = [float(f) for f in args.fractions.split(",") if float(f) < 1.0]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.miss, args.prefetch = args.miss.split(","), args.prefetch.split(",")
    cache = Path(env_defaults()["cache_dir"]) / "bench"
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
    lines = [f"Machine: {device}, {args.threads} torch thread(s), torch {torch.__version__}; tier {args.tier}, "
             f"policy {args.policy}, {args.tokens} new tokens per request, greedy, best of {args.repeats}.", "",
             "| model | batch | resident/E | prefetch | miss | tok/s | all-resident tok/s | ratio (wall) "
             "| ratio (CPU time) | hit rate | prefetch acc | stall s/run | MB moved/run | same tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    if args.quantized:
        lines[2:] = [f"16-bit vs {args.quantized} experts{' and dense projections' if args.quantize_dense else ''} "
                     "at the same device budget in bytes (prefetch "
                     f"{args.prefetch[0]}, miss fetch):", "",
                     "| model | batch | budget MB | 16-bit resident/E | 8-bit resident/E | 16-bit tok/s | 8-bit tok/s "
                     "| ratio | 16-bit hit rate | 8-bit hit rate | 16-bit MB moved/run | 8-bit MB moved/run |",
                     "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name in args.models.split(","):
        lines += bench_quantized(name, args, cache) if args.quantized else bench_model(name, args, cache)
    if args.rss:
        lines += ["", "| model | resident/E | peak RSS MB | bound MB (non-expert + resident + KV + 300) | floor MB "
                  "| non-expert MB (incl. fp32 copies) | resident MB | KV MB | within bound "
                  "| peak - floor - weights - KV, MB |",
                  "|---|---|---|---|---|---|---|---|---|---|", *rss_rows("mini", args, cache)]
        print("\n".join(lines[-3:]), flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
