"""Speculative decoding: code completion on tiny-trained, without speculation, with n-gram proposals and
with the tiny-trained-draft model, in one run.

    .venv/bin/python bench/speculative.py                          # bf16 (the checkpoint's), CPU, batch 1
    .venv/bin/python bench/speculative.py --set model.dtype=float32 --k 2,4,8
    .venv/bin/python bench/speculative.py --device cuda

Workload: the first lines of a few functions (stdlib-style Python, what tiny-trained was trained on), one
request at a time (batch 1), --tokens greedy tokens each. Per setting: decode tokens/s over all requests
(wall time of each request from arrival to its last token, best of --repeats), its ratio to plain decoding,
the proposals' acceptance rate, tokens per verification (1 + accepted per request-step that verified), and
how many requests produced exactly the tokens of plain decoding. In float32 all of them must; in 16-bit a
verification computes a token in a batch of k + 1 rows instead of 1, which can flip a near-tie between two
logits, as batching does too.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from moe_runtime.cli import env_defaults
from moe_runtime.config import load_config
from moe_runtime.engine.llm_engine import LLMEngine
from moe_runtime.engine.sampling_params import SamplingParams
from moe_runtime.kernels.cpu.dispatch import machine_key
from moe_runtime.presets.tiny_trained import write_trained

PROMPTS = (
    "def _split_path(path):\n    \"\"\"Split a path into its directory and its name.\"\"\"\n",
    "class OrderedCounter(dict):\n    def __init__(self, iterable=None):\n        self.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n\n"
    "def fibonacci_list(n):\n",
    "import os\nimport sys\n\n\ndef main(argv=None):\n    if argv is None:\n        argv = sys.argv[1:]\n",
    "    def __repr__(self):\n        return '%s(%r)' % (self.__class__.__name__, self.",
    "def read_lines(filename, encoding='utf-8'):\n    with open(filename, encoding=encoding) as f:\n",
)


def model_dir(name: str) -> Path:
    path = Path(env_defaults()["cache_dir"]) / "models" / name
    if not (path / "config.json").exists():
        write_trained(name, path)
    return path


def run(setting: list[str], args) -> dict:
    engine = LLMEngine(load_config(overrides=[f"model.path={model_dir('tiny-trained')}", f"model.device={args.device}",
                                              *setting, *args.overrides]))
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    prompts = [engine.encode(p) for p in PROMPTS]
    engine.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm up
    best, tokens = None, []
    for _ in range(args.repeats):
        wall, tokens = 0.0, []
        for p in prompts:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            tokens.append(engine.generate([p], params)[0].token_ids)
            wall += time.perf_counter() - t0
        best = wall if best is None else min(best, wall)
    stats = engine.make_stats()
    engine.shutdown()
    verified = stats.spec_verifications
    return dict(tok_s=sum(len(t) for t in tokens) / best, tokens=tokens,
                accept=stats.spec_accepted_tokens / stats.spec_proposed_tokens if stats.spec_proposed_tokens else None,
                per_verify=1 + stats.spec_accepted_tokens / verified if verified else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--k", default="4", help="comma-separated proposal lengths to run")
    ap.add_argument("--draft-k", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {"off": []}
    for k in (int(x) for x in args.k.split(",")):
        settings[f"ngram k={k}"] = ["speculative.method=ngram", f"speculative.num_tokens={k}"]
    settings[f"draft k={args.draft_k}"] = ["speculative.method=draft", f"speculative.num_tokens={args.draft_k}",
                                           f"speculative.draft_model={model_dir('tiny-trained-draft')}"]
    results = {name: run(setting, args) for name, setting in settings.items()}
    base = results["off"]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else machine_key()
    print(f"device: {device}; torch threads {torch.get_num_threads()}")
    print(f"tiny-trained, {len(PROMPTS)} code prompts one at a time, {args.tokens} greedy tokens each, best of "
          f"{args.repeats}; settings: {' '.join(args.overrides) or 'defaults'}\n")
    print("| setting | decode tok/s | vs off | acceptance | tokens per verification | outputs equal to off |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        same = sum(a == b for a, b in zip(r["tokens"], base["tokens"], strict=True))
        acc = "-" if r["accept"] is None else f"{r['accept']:.0%}"
        per = "-" if r["per_verify"] is None else f"{r['per_verify']:.2f}"
        print(f"| {name} | {r['tok_s']:.0f} | {r['tok_s'] / base['tok_s']:.2f}x | {acc} | {per} | "
              f"{same}/{len(PROMPTS)} |")


if __name__ == "__main__":
    main()
