"""Measured CPU dispatch: row plans, their measurement, their cache, and the kernels that follow them."""

from __future__ import annotations

import dataclasses
import doctest
import json

import pytest
import torch

from moe_runtime.kernels import cpu
from moe_runtime.kernels.cpu import dispatch, plan_cache
from moe_runtime.kernels.cpu.dispatch import ChunkPlan, CpuPlan, RowPlan
from moe_runtime.kernels.linear import CpuLinear

HAS_AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def test_doctests():
    assert doctest.testmod(dispatch).failed == 0


def test_a_row_plan_answers_every_row_count():
    plan = RowPlan(bounds=(1, 2, 4, 8, 16), choices=("native", "native", "bf16", "bf16", "fp32"))
    assert [plan.choice(n) for n in (1, 2, 3, 4, 5, 16, 17, 10_000)] == [
        "native", "native", "bf16", "bf16", "bf16", "fp32", "fp32", "fp32"]
    assert plan.max_rows("native") == 2 and plan.max_rows("fp32") == 16 and plan.max_rows("other") == 0
    assert dispatch.ranges(plan) == ["native 1-2", "bf16 3-8", "fp32 9-16", "(beyond 16: fp32)"]


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=pytest.mark.skipif(not HAS_AVX2, reason="AVX2"))])
def test_measured_plans_choose_among_their_candidates(native):
    linear = dispatch.plan_linear(96, 64, torch.bfloat16, max_rows=96, native=native)
    expert = dispatch.plan_expert(64, 48, torch.bfloat16, max_rows=96, native=native)
    for plan in (linear, expert):
        assert plan.bounds == (1, 2, 4, 8, 16, 32, 64, 96)
        allowed = {"bf16", "fp32", *(("native",) if native else ())}
        assert set(plan.choices) <= allowed
        assert plan.max_rows("native") <= dispatch.NATIVE_MAX_ROWS


def test_plans_survive_the_cache_and_a_bad_file_is_remeasured(tmp_path):
    plan = CpuPlan("cpu X", {"8x4": RowPlan((1, 9), ("native", "bf16"))}, RowPlan((4,), ("fp32",)), None)
    path = plan_cache.cache_file(tmp_path, plan.machine, "model")
    plan_cache.save_plan(plan, path)
    assert plan_cache.load_plan(path) == plan
    path.write_text("{not json")
    assert plan_cache.load_plan(path) is None
    assert plan_cache.cache_file(tmp_path, "cpu Y", "model") != path  # another machine, another plan


def test_a_prefill_chunk_survives_the_cache_and_an_old_plan_loads_without_it(tmp_path):
    chunk = ChunkPlan(chunk=256, limit=2048, sizes=(16, 32, 64, 128, 256, 512),
                      tokens_per_s=(41.5, 80.25, 150.0, 270.125, 430.0, 455.7))
    plan = CpuPlan("cpu X", {"8x4": RowPlan((1, 9), ("native", "bf16"))}, None, RowPlan((1,), ("native",)),
                   dot=RowPlan((1, 2, 4), ("avx2", "bf16dp", "bf16dp")),
                   dot_int8=RowPlan((1, 2, 4), ("avx2", "avx2", "bf16dp")), prefill=chunk)
    path = plan_cache.cache_file(tmp_path, plan.machine, "model")
    plan_cache.save_plan(plan, path)
    assert plan_cache.load_plan(path) == plan
    assert "prefill chunk: 256 tokens (prefill tok/s by chunk: 16: 42, 32: 80," in plan.describe()
    assert "native bf16 tiles: avx2 1, bf16dp 2-4" in plan.describe() and dispatch.dot_min_rows(plan.dot) == 2
    assert "native int8 tiles: avx2 1-2, bf16dp 3-4" in plan.describe() and dispatch.dot_min_rows(plan.dot_int8) == 3
    old = json.loads(path.read_text())
    del old["prefill"]  # a plan cached before the prefill chunk was measured: the engine measures it then
    path.write_text(json.dumps(old))
    assert plan_cache.load_plan(path) == dataclasses.replace(plan, prefill=None)
    path.write_text(json.dumps({**old, "prefill": {"chunk": 256}}))  # a damaged entry: measure everything again
    assert plan_cache.load_plan(path) is None


@pytest.mark.skipif(not HAS_AVX2, reason="the native CPU kernels run only on AVX2 CPUs")
def test_the_cpu_linear_runs_what_its_plan_picks(monkeypatch):
    w = (torch.randn(32, 16) / 4).bfloat16()
    ran = []
    real = cpu.linear
    monkeypatch.setattr(cpu, "linear", lambda x, w: ran.append(x.shape[0]) or real(x, w))
    plan = CpuPlan("m", {"32x16": RowPlan(bounds=(2, 8), choices=("native", "fp32"))})
    kernel = CpuLinear(plan)
    kernel.prepare(w)
    assert kernel.weight_fp32 is not None  # the plan uses fp32 somewhere: the copy exists
    for rows in (1, 2, 3, 8, 50):
        x = torch.randn(rows, 16).bfloat16()
        torch.testing.assert_close(kernel(x, w).float(), (x.float() @ w.float().T), atol=3e-2, rtol=2e-2)
    assert ran == [1, 2]  # native up to 2 rows, the fp32 copy beyond
    only_bf16 = CpuLinear(CpuPlan("m", {"32x16": RowPlan(bounds=(8,), choices=("bf16",))}))
    only_bf16.prepare(w)
    assert only_bf16.weight_fp32 is None  # never used: no copy, no memory spent
    x = torch.randn(5, 16).bfloat16()
    assert torch.equal(only_bf16(x, w), torch.nn.functional.linear(x, w))


@pytest.mark.skipif(not HAS_AVX2, reason="the native CPU kernels run only on AVX2 CPUs")
def test_an_engine_measures_once_per_machine_then_reads_the_cache(tiny_model_dir, tmp_path, monkeypatch):
    from moe_runtime.config import load_config
    from moe_runtime.launch import build_engine

    measured = []
    real = dispatch.plan_linear
    monkeypatch.setattr(dispatch, "plan_linear", lambda *a: measured.append(a[:2]) or real(*a))
    sets = [f"model.path={tiny_model_dir}", "model.dtype=bfloat16", "cache.num_blocks=64",
            f"engine.cpu_plan_dir={tmp_path}"]
    first = build_engine(load_config(overrides=sets))
    assert len(measured) == 3  # q/k/v stacked, o_proj, the head
    (cached,) = tmp_path.glob("cpu-plan-*.json")
    plan = plan_cache.load_plan(cached)
    assert plan.decode is not None and plan.expert is not None
    head = first.executor.model.lm_head.kernel
    assert head.rows == plan.linear[dispatch.shape_key(first.executor.model.lm_head.weight.shape)]
    measured.clear()
    build_engine(load_config(overrides=sets))
    assert measured == []
    exact = build_engine(load_config(overrides=[*sets, "model.exact=true"]))
    assert measured == [] and not isinstance(exact.executor.model.lm_head.kernel, CpuLinear)
