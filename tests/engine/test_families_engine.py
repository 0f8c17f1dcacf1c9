"""The engine on the other families: batching, chunked prefill and preemption never change greedy tokens;
the CPU fast path decodes them eagerly (the native decode step is Mixtral's, chosen by construction);
router counts and telemetry cover every (layer, expert), dense layers' rows zero, up to 128 experts."""

from __future__ import annotations

import io
import json

import pytest
import torch
from engine_cases import PROMPTS, reference_greedy, reference_logits
from rich.console import Console

from moe_runtime.checkpoint.loader import load_model
from moe_runtime.commands import stats_wide
from moe_runtime.commands.stats import render
from moe_runtime.config import load_config
from moe_runtime.engine.cpu_decode import CpuDecodeForward
from moe_runtime.engine.forward import EagerForward
from moe_runtime.engine.llm_engine import LLMEngine
from moe_runtime.engine.sampling_params import SamplingParams
from moe_runtime.presets.configs import preset_config
from moe_runtime.presets.init_model import write_checkpoint
from moe_runtime.telemetry import Telemetry

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
# The CPU fast path moves bf16 logits by up to this against the exact model (tests/engine/test_native_kernels.py):
# a greedy token is then within twice that of the exact model's argmax.
FAST_ATOL = 0.1
# preset, overrides: each family as released, Qwen3 also with a dense layer
MODELS = {
    "qwen3": ("tiny-qwen3moe", {}),
    "qwen3-dense": ("tiny-qwen3moe", dict(num_hidden_layers=3, mlp_only_layers=[1], num_experts=32)),
    "qwen2": ("tiny-qwen2moe", {}),
    "olmoe": ("tiny-olmoe", {}),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {name: write_checkpoint(tmp_path_factory.mktemp(name), preset_config(preset, **overrides), seed=0)
            for name, (preset, overrides) in MODELS.items()}


def engine(ckpt, *sets) -> LLMEngine:
    return LLMEngine(load_config(overrides=[f"model.path={ckpt}", "cache.num_blocks=256", "engine.seed=0", *sets]))


def tokens(eng: LLMEngine, prompts=PROMPTS) -> list[list[int]]:
    return [out.token_ids for out in eng.generate(list(prompts), GREEDY)]


@pytest.mark.parametrize("name", MODELS)
def test_batched_chunked_and_preempted_equal_each_alone(checkpoints, name):
    model = load_model(checkpoints[name], device="cpu")
    expected = [reference_greedy(model, p, GREEDY.max_tokens) for p in PROMPTS]
    assert tokens(engine(checkpoints[name])) == expected
    assert tokens(engine(checkpoints[name], "engine.max_num_batched_tokens=5")) == expected
    preempting = engine(checkpoints[name], "cache.num_blocks=12", "cache.block_size=4")
    assert tokens(preempting) == expected
    assert preempting.make_stats().num_preemptions > 0


@pytest.mark.parametrize("name", MODELS)
def test_cpu_fast_path_decodes_eagerly(checkpoints, tmp_path, name):
    """bf16 on the CPU fast path: the parts are the fast ones, the step runner the eager one (by the registry,
    whatever the kernels offer), and greedy tokens are the exact model's argmax within the fast path's error."""
    hf = json.loads((checkpoints[name] / "config.json").read_text())
    ckpt = write_checkpoint(tmp_path / "bf16", {**hf, "torch_dtype": "bfloat16"}, seed=0)
    eng = engine(ckpt, f"engine.cpu_plan_dir={tmp_path / 'plans'}")
    forward = eng.executor.runner.forward
    assert type(forward) is EagerForward and not isinstance(forward, CpuDecodeForward)
    got = tokens(eng, PROMPTS[:2])
    exact = load_model(ckpt, device="cpu")
    for prompt, out in zip(PROMPTS[:2], got, strict=True):
        logits = reference_logits(exact, prompt + out[:-1])[len(prompt) - 1:]  # [N, V] teacher-forced
        gap = logits.max(dim=1).values - logits.gather(1, torch.tensor(out)[:, None])[:, 0]
        assert float(gap.max()) <= 2 * FAST_ATOL


def test_router_counts_cover_every_layer_and_expert(checkpoints):
    eng = engine(checkpoints["qwen3-dense"])
    cfg = eng.executor.model_config
    eng.add_request("r", PROMPTS[2], GREEDY)
    eng.step()  # the prompt's prefill (38 tokens)
    counts = eng.make_stats().router_counts  # [L, E]
    assert counts.shape == (3, 32)
    assert counts[1].sum() == 0  # the dense layer routes nothing
    assert [int(counts[l].sum()) for l in cfg.moe_layers] == [len(PROMPTS[2]) * 8] * 2
    assert int((counts[0] > 0).sum()) > 8  # many experts


def test_telemetry_and_stats_at_128_experts(checkpoints, capsys, monkeypatch):
    eng = engine(checkpoints["qwen3"])
    cfg = eng.executor.model_config
    telemetry = Telemetry(cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok)
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"r{i}", p, GREEDY)
    while eng.has_unfinished():
        eng.step()
        telemetry.observe_step(eng.make_stats())
    snap = telemetry.snapshot().to_dict()
    assert snap["experts"] == 128 and len(snap["tokens_per_expert"]) == 2
    assert all(len(row) == 128 for row in snap["tokens_per_expert"])
    assert [sum(row) for row in snap["total_tokens_per_expert"]] == [snap["tokens_processed"] * 8] * 2
    out = io.StringIO()
    monkeypatch.setattr("rich.console.Console", lambda: Console(file=out, width=80))
    render(snap, "tokens_per_expert")
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    strips = [line for line in text.splitlines() if "▁" in line or "█" in line or "·" in line]
    assert len(strips) >= 2 * 128 // stats_wide.PER_LINE  # each layer: 128 experts over 4 lines


def test_wide_placement_table_lists_ranges(capsys):
    out = io.StringIO()
    stats_wide.render_placement(Console(file=out, width=80), [[list(range(64)) + [100]] * 2,
                                                               [list(range(64, 128))] * 2])
    assert "0-63,100" in out.getvalue() and "64-127" in out.getvalue()


def test_native_decode_step_only_for_the_family_it_implements(checkpoints, tiny_model_dir):
    """`make_forward` with kernels that offer native decode steps: Mixtral gets them, the others the eager
    step (decided by the registry, not by probing the layers)."""
    from moe_runtime.engine.kv_cache import allocate_kv_cache
    from moe_runtime.engine.parts import KernelChoice, make_forward

    kernels = KernelChoice(attention="cpu", norm="torch", linear="cpu", moe="torch", huge_pages=False,
                           native_decode=True)
    engine_cfg = load_config().engine
    for ckpt, want in ((tiny_model_dir, CpuDecodeForward), *((c, EagerForward) for c in checkpoints.values())):
        model = load_model(ckpt, device="cpu")
        kv = allocate_kv_cache(model.config, 8, 16, model.dtype, model.device)
        assert type(make_forward(model, kv, kernels, engine_cfg, graphs_allowed=True)) is want, ckpt


def test_telemetry_with_a_dense_first_layer():
    """Qwen2-MoE with decoder_sparse_step=2: layer 0 is dense. Tokens processed come from a sparse layer and
    the mean imbalance / entropy average the sparse layers only."""
    from types import SimpleNamespace

    telemetry = Telemetry(num_layers=4, num_experts=4, top_k=2)
    counts = torch.tensor([[0, 0, 0, 0], [3, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])  # 2 tokens x top-2
    telemetry.observe_step(SimpleNamespace(steps=1, router_counts=counts, step_num_tokens=2))
    snap = telemetry.snapshot()
    assert snap.tokens_processed == 2
    assert snap.mean_imbalance == pytest.approx((3.0 + 1.0) / 2)
    assert snap.mean_entropy == pytest.approx((snap.entropy[1] + 1.0) / 2)
