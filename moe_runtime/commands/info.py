"""`moe-runtime info`: this machine, and the kernels the engine would pick on it for a model.

    moe-runtime info                              # the mini preset's shapes, bf16, the defaults
    moe-runtime info --model DIR [--set model.dtype=bfloat16] [--set engine.max_num_seqs=16]

Prints the CPU (model name, the ISA flags that pick kernels), torch, whether the native CPU kernels built,
the GPU if any, then the kernel choice of `engine/parts.py` for the model on the configured device, and on
the CPU fast path its measured plan: which implementation runs each hot op at each row count (read from the
plan cache, or measured now and cached, as the engine does at start-up), and the prompt tokens a step
prefills (`engine.prefill_chunk`). The decode-step plan and the prefill chunk are measured on the loaded
model, at the engine's first start.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

NAME = "info"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME, help="this machine's CPU/GPU and the kernels the engine picks on it",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (config.json is enough); default: mini")
    p.add_argument("--config", default=None, help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.set_defaults(run=run, parser=p)


def run(args: argparse.Namespace) -> int:
    import torch

    from moe_runtime.checkpoint.layout import resolve_dtype
    from moe_runtime.checkpoint.loader import read_config, resolve_device, weight_formats
    from moe_runtime.config import ModelConfig, load_config
    from moe_runtime.engine.parts import choose_kernels, cpu_plan
    from moe_runtime.kernels import cpu
    from moe_runtime.kernels.cpu.dispatch import machine_key
    from moe_runtime.model.registry import family
    from moe_runtime.presets.configs import preset_config

    overrides = list(args.overrides)
    if args.model is not None:
        overrides.append(f"model.path={json.dumps(str(args.model))}")
    cfg = load_config(args.config, overrides)
    model_cfg = read_config(cfg.model.path) if cfg.model.path else ModelConfig.from_hf(preset_config("mini"))
    device, dtype = resolve_device(cfg.model.device), resolve_dtype(cfg.model.dtype, model_cfg)
    print(f"machine: {machine_key()}")
    print(f"torch CPU capability: {torch.backends.cpu.get_cpu_capability()}; "
          f"native CPU kernels: {'built' if cpu.available() else 'not available'}")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"GPU: {gpu}")
    kernels = choose_kernels(cfg.model, device, dtype)
    # The native decode step implements some families' decoder layers only (engine/parts.make_forward).
    native_decode = kernels.native_decode and family(model_cfg).native_decode
    print(f"model: {cfg.model.path or 'the mini preset'} ({model_cfg.num_hidden_layers} layers, hidden "
          f"{model_cfg.hidden_size}, {model_cfg.num_local_experts} experts); {device}, {dtype}")
    print(f"kernels: attention {kernels.attention}, norm {kernels.norm}, linear {kernels.linear}, "
          f"MoE {kernels.moe}; huge pages {'on' if kernels.huge_pages else 'off'}; native decode steps "
          f"{'on' if native_decode else 'off'}")
    formats = weight_formats(cfg.model.path, cfg.model)  # as the engine measures its plan
    print(f"weights: experts {formats.experts}, dense projections {formats.dense} (none: {dtype})")
    plan = cpu_plan(kernels, model_cfg, dtype, cfg.engine, formats)
    # The prefill chunk is measured for `auto` by the local executor with local experts (engine/executor.py).
    measured = cfg.engine.prefill_chunk == "auto" and cfg.executor == "local" and not cfg.offload.enabled
    if plan is not None:
        print((plan if measured else dataclasses.replace(plan, prefill=None)).describe())
        if plan.decode is None and native_decode:
            print("decode step: measured on the loaded model at the engine's first start")
    if cfg.engine.prefill_chunk != "auto":
        print(f"prefill chunk: {cfg.engine.prefill_chunk} tokens (engine.prefill_chunk)")
    elif not measured or plan is None:
        print(f"prefill chunk: {cfg.engine.max_num_batched_tokens} tokens (engine.max_num_batched_tokens; "
              "measured on the CPU fast path of the local executor with local experts only)")
    elif plan.prefill is None:
        print("prefill chunk: measured on the loaded model at the engine's first start")
    return 0
