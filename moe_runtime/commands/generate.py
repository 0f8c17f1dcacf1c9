"""`moe-runtime generate`: run prompts through the engine, batched together, and print the results.

    moe-runtime generate --model DIR (--prompt TEXT | --prompt-ids 1,2,3)... | --prompts-file F
        [--max-tokens N] [--temperature T] [--top-k K] [--top-p P] [--min-p P] [--seed S] [--stop S]...
        [--stop-token-ids 1,2] [--ignore-eos] [--logprobs N] [--dtype D] [--json]

Without `--model` (and no `model.path` in the config) it uses the embedded `tiny` model from the user cache.
With `--json` it prints one object per prompt, in order:
`{"token_ids": [...], "text": "...", "finish_reason": "length"|"stop", ...}` (EOS counts as "stop").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe_runtime.errors import MissingTokenizerError, RequestError


def _token_ids(value: str) -> list[int]:
    try:
        return [int(t) for t in value.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected comma-separated token ids, e.g. 1,2,3") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text for one or more prompts (batched in one engine run)")
    p.add_argument("--model", default=None, help="HF checkpoint directory (default: the embedded tiny model)")
    p.add_argument("--config", default=None, help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    src = p.add_argument_group("prompts (repeatable; kept in order)")
    src.add_argument("--prompt", dest="prompts", action="append", type=str, metavar="TEXT")
    src.add_argument("--prompt-ids", dest="prompts", action="append", type=_token_ids, metavar="1,2,3")
    src.add_argument("--prompts-file", default=None, help="one text prompt per line")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], metavar="STRING")
    p.add_argument("--stop-token-ids", type=_token_ids, default=[], metavar="1,2")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--logprobs", type=int, default=None, metavar="N", help="also the top N alternatives")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default=None)
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    remote = p.add_argument_group("remote (a running `moe-runtime serve`; token from MOE_RUNTIME_AUTH_TOKEN)")
    remote.add_argument("--server", default=None, metavar="HOST:PORT", help="generate on this server over gRPC")
    remote.add_argument("--tls-ca", default=None, help="PEM CA certificate: connect with TLS")
    remote.add_argument("--timeout", type=float, default=None, help="seconds per request (default: none)")
    p.set_defaults(run=run, parser=p)


def run(args: argparse.Namespace) -> int:
    if args.server is not None:
        from moe_runtime.server.client import run_generate

        if args.model is not None or args.config is not None or args.dtype is not None:
            args.parser.error("--server generates on the server's model; drop --model/--config/--dtype")
        return run_generate(args, collect_prompts(args))
    return run_offline(args)


def collect_prompts(args: argparse.Namespace) -> list[str | list[int]]:
    """Prompts from --prompt / --prompt-ids (in order) then --prompts-file; exits 2 when there are none."""
    prompts: list[str | list[int]] = list(args.prompts or [])
    if args.prompts_file is not None:
        try:
            lines = Path(args.prompts_file).read_text().splitlines()
        except OSError as e:
            args.parser.error(f"--prompts-file {args.prompts_file}: {e.strerror}")
        prompts.extend(line for line in lines if line.strip())
    if not prompts:
        args.parser.error("give at least one of --prompt, --prompt-ids or --prompts-file")
    return prompts


def sampling_params(args: argparse.Namespace):
    from moe_runtime.engine.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, seed=args.seed, stop=tuple(args.stop), stop_token_ids=tuple(args.stop_token_ids),
        ignore_eos=args.ignore_eos, logprobs=args.logprobs,
    )


def output_record(out) -> dict:
    """The JSON object printed for one finished request."""
    record = {
        "token_ids": out.token_ids,
        "text": out.text,
        "finish_reason": "stop" if out.finish_reason == "eos" else out.finish_reason,
        "num_prompt_tokens": out.num_prompt_tokens,
        "num_output_tokens": out.num_output_tokens,
    }
    if out.logprobs is not None:
        record["logprobs"] = [
            {"token_id": lp.token_id, "logprob": lp.logprob, "top": [list(t) for t in lp.top]} for lp in out.logprobs
        ]
    return record


def run_offline(args: argparse.Namespace) -> int:
    """Load the model in this process and run every prompt in one batch."""
    from moe_runtime.config import load_config
    from moe_runtime.launch import build_engine
    from moe_runtime.presets.default_model import ensure_default_model

    prompts = collect_prompts(args)
    params = sampling_params(args)
    overrides = list(args.overrides)
    if args.model is not None:
        overrides.append(f"model.path={json.dumps(str(args.model))}")
    if args.dtype is not None:
        overrides.append(f"model.dtype={args.dtype}")
    cfg = load_config(args.config, overrides)
    if cfg.model.path is None:
        path = ensure_default_model(args.env["cache_dir"])
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": str(path)})})
    engine = build_engine(cfg, progress=sys.stderr.isatty())
    try:
        outputs = engine.generate(prompts, params)
    except (RequestError, MissingTokenizerError) as e:
        print(f"moe-runtime generate: error: {e}", file=sys.stderr)
        return 2
    finally:
        engine.shutdown()
    for out in outputs:
        if args.json:
            print(json.dumps(output_record(out), ensure_ascii=False))
        else:
            print(out.text)
    return 0
