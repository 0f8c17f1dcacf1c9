"""The prefill chunk: the choice over measured figures, the ladder, the config, and engines that follow it.

Greedy tokens are compared in fp32 (the `tiny` checkpoint's dtype): chunking changes the row count of each
GEMM, and in 16-bit the CPU fast path may run another implementation per row count (kernels/cpu/dispatch.py)
and rounds each GEMM to bf16, so logits move by a few ulps and a near tie could flip; in fp32 with torch's
kernels (the CPU fast path is for 16-bit weights only) the same sums differ by ~1e-7 relative, far below
the tiny model's greedy margins, as tests/engine/test_engine.py's chunked-prefill cases rely on too.
"""

from __future__ import annotations

import json

import pytest
from engine_cases import PROMPTS, reference_greedy

from moe_runtime.config import EngineConfig, load_config
from moe_runtime.engine import prefill_chunk
from moe_runtime.engine.block_manager import BlockManager
from moe_runtime.engine.llm_engine import LLMEngine
from moe_runtime.engine.prefill_chunk import choose_chunk, ladder, resolve_prefill_chunk, run_ladder
from moe_runtime.engine.request import Request
from moe_runtime.engine.sampling_params import SamplingParams
from moe_runtime.engine.scheduler import Scheduler
from moe_runtime.engine.scheduler_output import ModelRunnerOutput
from moe_runtime.errors import ConfigError
from moe_runtime.kernels.cpu import plan_cache

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

# (measured (chunk, tok/s) pairs, tolerance, the choice)
CHOICES = (
    ([(16, 100.0), (32, 180.0), (64, 200.0), (128, 205.0)], 0.10, 64),  # 180 < 0.9 * 205 <= 200
    ([(16, 50.0), (32, 200.0), (64, 200.0)], 0.10, 32),  # a tie: the smaller
    ([(16, 300.0), (32, 200.0), (64, 250.0)], 0.10, 16),  # the best is the smallest
    ([(16, 90.0), (32, 100.0)], 0.10, 16),  # exactly at the tolerance: within
    ([(16, 199.0), (32, 200.0)], 0.0, 32),  # no tolerance: the best only
    ([(2048, 10.0)], 0.10, 2048),
)
BAD_MEASUREMENTS = ([], [(32, 1.0), (16, 2.0)], [(16, 1.0), (16, 2.0)], [(0, 1.0)])
# (overrides, what the error names)
BAD_CONFIGS = (
    (["engine.prefill_chunk=0"], "engine.prefill_chunk=0: out of range; allowed: \"auto\" or 1..2048"),
    (["engine.prefill_chunk=4096"], "engine.prefill_chunk=4096: out of range; allowed: \"auto\" or 1..2048"),
    (["engine.max_num_batched_tokens=512", "engine.prefill_chunk=1024"], "engine.prefill_chunk=1024: out of range; "
     "allowed: \"auto\" or 1..512"),
    (["engine.prefill_chunk=fast"], "engine.prefill_chunk='fast': allowed: \"auto\" or a number of tokens"),
    (["engine.prefill_chunk=true"], "engine.prefill_chunk=True: allowed: \"auto\" or a number of tokens"),
    (["engine.prefill_chunk=12.5"], "engine.prefill_chunk=12.5: allowed: \"auto\" or a number of tokens"),
)


@pytest.mark.parametrize(("measured", "tolerance", "want"), CHOICES)
def test_the_choice_is_the_smallest_chunk_within_tolerance_of_the_best(measured, tolerance, want):
    assert choose_chunk(measured, tolerance) == want


@pytest.mark.parametrize("measured", BAD_MEASUREMENTS)
def test_the_choice_refuses_figures_it_cannot_order(measured):
    with pytest.raises(ValueError, match="measured"):
        choose_chunk(measured)


def test_the_ladder_doubles_up_to_its_limit():
    assert ladder(2048) == (16, 32, 64, 128, 256, 512, 1024, 2048)
    assert ladder(100) == (16, 32, 64, 100) and ladder(16) == (16,) and ladder(5) == (5,)


def _timed(rates: dict[int, float], calls: list[int]):
    """seconds_of for `run_ladder` from a table of tokens/s, recording the sizes it was asked for."""
    return lambda n: calls.append(n) or n / rates[n]


def test_the_ladder_stops_once_throughput_stops_improving():
    calls: list[int] = []
    rates = {16: 100.0, 32: 190.0, 64: 200.0, 128: 202.0, 256: 201.0, 512: 900.0, 1024: 950.0}
    measured = run_ladder(_timed(rates, calls), (16, 32, 64, 128, 256, 512, 1024))
    # 200 is a gain of >= MIN_GAIN over 190; 202 and 201 are not: PATIENCE (2) sizes without one end it
    assert calls == [16, 32, 64, 128, 256] and [n for n, _ in measured] == calls
    assert choose_chunk(measured) == 32


def test_one_dip_does_not_stop_the_ladder():
    calls: list[int] = []
    rates = {16: 100.0, 32: 200.0, 64: 150.0, 128: 400.0, 256: 410.0}
    assert [n for n, _ in run_ladder(_timed(rates, calls), (16, 32, 64, 128, 256))] == [16, 32, 64, 128, 256]


def test_a_rising_ladder_is_measured_to_its_limit():
    calls: list[int] = []
    run_ladder(_timed({n: 1000.0 * n for n in ladder(2048)}, calls), ladder(2048))  # 1 ms a forward
    assert calls == list(ladder(2048))


def test_the_ladder_never_starts_a_size_past_its_budget():
    calls: list[int] = []
    # 10 tok/s: 16 tokens take 1.6 s (3.2 s for ROUNDS=2), 32 would take 6.4 s more: past a 5 s budget
    measured = run_ladder(_timed({16: 10.0, 32: 20.0}, calls), (16, 32), budget_s=5.0)
    assert calls == [16] and measured == [(16, 10.0)]


def test_resolution_fixed_measured_or_the_cap():
    cfg = EngineConfig(max_num_batched_tokens=512)
    assert resolve_prefill_chunk(cfg, 128) == 128
    assert resolve_prefill_chunk(cfg, None) == 512  # not measured (GPU, exact, Ray): the cap
    assert resolve_prefill_chunk(cfg, 1024) == 512  # never past the cap
    assert resolve_prefill_chunk(EngineConfig(prefill_chunk=64), 128) == 64  # an int is kept as given


@pytest.mark.parametrize(("sets", "message"), BAD_CONFIGS)
def test_a_bad_prefill_chunk_names_the_field_the_value_and_the_range(sets, message):
    with pytest.raises(ConfigError, match="prefill_chunk") as e:
        load_config(overrides=sets)
    assert message in str(e.value)


def test_a_step_prefills_at_most_the_chunk_alongside_running_decodes():
    """Two prompts arrive while a request decodes: every step keeps the decode and grants the prompts, both
    together, at most the chunk; the step cap alone would have taken both prompts whole."""
    scheduler = Scheduler(EngineConfig(max_num_batched_tokens=64), BlockManager(32, 4), prefill_chunk=8)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    requests = {rid: Request(rid, list(range(first, first + n)), params, eos_token_ids=(2,))
                for rid, first, n in (("d", 3, 3), ("p", 10, 13), ("q", 30, 6))}  # no shared prefix
    scheduler.add(requests["d"])
    steps = []
    for i in range(6):
        if i == 1:
            scheduler.add(requests["p"])
            scheduler.add(requests["q"])
        sched = scheduler.schedule()
        steps.append(dict(sched.num_scheduled_tokens))
        done = [rid for rid, n in sched.num_scheduled_tokens.items()
                if sched.num_computed_tokens[rid] + n == requests[rid].num_tokens]
        scheduler.update_from_output(sched, ModelRunnerOutput(done, [[7]] * len(done), [None] * len(done)))
    assert steps == [{"d": 3}, {"d": 1, "p": 8}, {"d": 1, "p": 5, "q": 3}, {"d": 1, "p": 1, "q": 3},
                     {"d": 1, "p": 1, "q": 1}, {"d": 1, "p": 1, "q": 1}]


def test_a_long_prompt_is_prefilled_in_chunks_with_the_same_greedy_tokens(tiny_model_dir, tmp_path):
    from moe_runtime.checkpoint.loader import load_model

    sets = [f"model.path={tiny_model_dir}", "cache.num_blocks=256", f"engine.cpu_plan_dir={tmp_path}"]
    whole = LLMEngine(load_config(overrides=sets))  # fp32: auto is the step cap (no CPU fast path)
    chunked = LLMEngine(load_config(overrides=[*sets, "engine.prefill_chunk=8"]))
    assert (whole.scheduler.prefill_chunk, chunked.scheduler.prefill_chunk) == (2048, 8)
    long = PROMPTS[2]  # 38 tokens: 5 steps of at most 8
    chunked.add_request("long", long, GREEDY)
    computed = []
    while not chunked.step():
        computed.append(chunked.scheduler.requests["long"].num_computed_tokens)
    assert computed == [8, 16, 24, 32]  # the 5th step computes the last 6 and samples
    chunked.abort("long")
    model = load_model(tiny_model_dir, device="cpu")
    expected = [reference_greedy(model, p, GREEDY.max_tokens) for p in PROMPTS]
    for engine in (whole, chunked):
        assert [out.token_ids for out in engine.generate(list(PROMPTS), GREEDY)] == expected


def _bf16(tiny_model_dir, plans, *extra) -> LLMEngine:
    """An engine on the CPU fast path (16-bit weights), its plans cached in `plans`."""
    return LLMEngine(load_config(overrides=[f"model.path={tiny_model_dir}", "model.dtype=bfloat16",
                                            "cache.num_blocks=256", f"engine.cpu_plan_dir={plans}", *extra]))


def test_auto_follows_the_measured_chunk_and_an_int_is_honoured(tiny_model_dir, tmp_path, monkeypatch):
    figures = [(16, 100.0), (32, 190.0), (64, 200.0), (128, 195.0), (256, 196.0)]
    monkeypatch.setattr(prefill_chunk, "run_ladder", lambda seconds_of, sizes: figures)
    engine = _bf16(tiny_model_dir, tmp_path)
    assert engine.scheduler.prefill_chunk == 32 == engine.executor.measured_prefill_chunk
    engine.add_request("long", list(range(3, 103)), GREEDY)  # 100 tokens: 32, 32, 32, 4
    computed = []
    while not engine.step():
        computed.append(engine.scheduler.requests["long"].num_computed_tokens)
    assert computed == [32, 64, 96]
    engine.abort("long")
    fixed = _bf16(tiny_model_dir, tmp_path, "engine.prefill_chunk=16")
    assert fixed.scheduler.prefill_chunk == 16


def test_the_measured_chunk_is_cached_and_an_old_plan_measures_it(tiny_model_dir, tmp_path, monkeypatch):
    from moe_runtime.engine import parts

    first = _bf16(tiny_model_dir, tmp_path)
    (path,) = tmp_path.glob("cpu-plan-*.json")
    chunk = plan_cache.load_plan(path).prefill
    assert chunk.limit == 2048 and chunk.sizes == ladder(2048)[: len(chunk.sizes)]
    assert chunk.chunk in chunk.sizes and first.scheduler.prefill_chunk == chunk.chunk
    measured = []
    real = parts.plan_prefill
    monkeypatch.setattr(parts, "plan_prefill", lambda *a: measured.append(a[2]) or real(*a))
    assert _bf16(tiny_model_dir, tmp_path).scheduler.prefill_chunk == chunk.chunk and measured == []
    old = json.loads(path.read_text())
    del old["prefill"]  # as plans were cached before the prefill chunk was measured
    path.write_text(json.dumps(old))
    _bf16(tiny_model_dir, tmp_path)
    assert measured == [2048] and plan_cache.load_plan(path).prefill is not None
    _bf16(tiny_model_dir, tmp_path, "engine.max_num_batched_tokens=256")  # another cap: another plan file
    assert measured == [2048, 256]


def test_doctests():
    import doctest

    assert doctest.testmod(prefill_chunk).failed == 0
