"""Prefix caching: requests sharing a long prompt prefix, with the cache on and off, in one run.

    .venv/bin/python bench/prefix_cache.py                          # mini, 16 requests, 512-token prefix
    .venv/bin/python bench/prefix_cache.py --set model.dtype=float32             # exact: every output equal

Workload (issue 22): one shared prefix of --prefix random tokens (a system prompt), --requests requests
each adding --suffix distinct tokens, --new-tokens greedy tokens each. First one request with the prefix
alone primes the cache (as earlier traffic would); then all requests arrive together. Per setting: prompt
tokens computed by the batch (the engine's counter), TTFT p50 / p90 over the batch (arrival to first
token), its wall time, and how many requests' greedy tokens equal the run without the cache. In float32
they all do; in 16-bit a token's numerics depend on the batch it is computed in (which kernel a row count
picks, how a GEMM splits), with or without the cache, so a near-tie between two logits (the random presets
have many) can flip: compare with `--set model.dtype=float32` for exactness. Each setting runs
--repeats times on a fresh engine, cache on and off taking turns; the best wall time is kept.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from moe_runtime.cli import env_defaults
from moe_runtime.config import load_config
from moe_runtime.engine.llm_engine import LLMEngine
from moe_runtime.engine.sampling_params import SamplingParams
from moe_runtime.kernels.cpu.dispatch import machine_key
from moe_runtime.presets.init_model import init_model


def run(model_dir: Path, caching: bool, prompts: list[list[int]], primer: list[int], args) -> dict:
    sets = [f"model.path={model_dir}", "model.device=cpu", f"cache.prefix_caching={str(caching).lower()}",
            f"engine.max_num_seqs={len(prompts)}", *args.overrides]
    engine = LLMEngine(load_config(overrides=sets))
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    engine.generate([primer], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    before = engine.make_stats().num_prompt_tokens
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    first: dict[str, float] = {}
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            first.setdefault(out.request_id, time.perf_counter() - t0)
            if out.finished:
                tokens[out.request_id] = out.token_ids
    wall = time.perf_counter() - t0
    ttft = sorted(first.values())
    stats = engine.make_stats()
    engine.shutdown()
    return dict(computed=stats.num_prompt_tokens - before, ttft50=statistics.median(ttft),
                ttft90=ttft[int(0.9 * (len(ttft) - 1))], wall=wall, hits=stats.prefix_cache_hits,
                tokens=[tokens[f"r{i}"] for i in range(len(prompts))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--model", type=Path, default=None, help="default: the preset in the user cache")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prefix", type=int, default=512)
    ap.add_argument("--suffix", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model or Path(env_defaults()["cache_dir"]) / "models" / args.preset
    if not (model_dir / "config.json").exists():
        init_model(args.preset, model_dir, seed=0)
    gen = torch.Generator().manual_seed(0)
    prefix = [1] + torch.randint(3, 1000, (args.prefix - 1,), generator=gen).tolist()
    prompts = [prefix + torch.randint(3, 1000, (args.suffix,), generator=gen).tolist() for _ in range(args.requests)]
    primer = prefix + [2]
    best: dict[bool, dict] = {}
    for _ in range(args.repeats):
        for caching in (False, True):
            r = run(model_dir, caching, prompts, primer, args)
            if caching not in best or r["wall"] < best[caching]["wall"]:
                best[caching] = r
    off, on = best[False], best[True]
    print(f"machine: {machine_key()}")
    print(f"model {model_dir.name}; {args.requests} requests, prefix {args.prefix} + {args.suffix} tokens, "
          f"{args.new_tokens} new; threads {torch.get_num_threads()}; best of {args.repeats}\n")
    print("| cache | prompt tokens computed | TTFT p50 s | TTFT p90 s | wall s | requests with the tokens of off |")
    print("|---|---|---|---|---|---|")
    for name, r in (("off", off), ("on", on)):
        same = sum(a == b for a, b in zip(r["tokens"], off["tokens"], strict=True))
        print(f"| {name} | {r['computed']} | {r['ttft50']:.3f} | {r['ttft90']:.3f} | {r['wall']:.2f} "
              f"| {same}/{len(off['tokens'])} |")
    print(f"\nprompt tokens computed: {off['computed'] / max(on['computed'], 1):.1f}x fewer; TTFT p50 "
          f"{off['ttft50'] / on['ttft50']:.1f}x lower")


if __name__ == "__main__":
    main()
