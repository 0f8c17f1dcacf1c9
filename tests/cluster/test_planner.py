"""Planner properties (hypothesis), the stats format, and the plan-placement command end to end."""

from __future__ import annotations

import argparse
import doctest
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_runtime.cluster import planner as planner_module
from moe_runtime.cluster.placement import Placement
from moe_runtime.cluster.planner import (
    balanced_packing,
    parse_stats,
    plan_placement,
    rank_loads,
    replicate_experts,
    round_robin,
)
from moe_runtime.commands import plan_placement as command
from moe_runtime.config import ModelConfig, load_config
from moe_runtime.errors import ConfigError


def test_doctests():
    assert doctest.testmod(planner_module).failed == 0


@st.composite
def problems(draw):
    """(load [L, E], workers, redundant): skewed integer loads, zeros and ties included."""
    num_layers = draw(st.integers(1, 3))
    num_experts = draw(st.integers(1, 10))
    workers = draw(st.integers(1, 6))
    redundant = draw(st.integers(0, num_experts * (workers - 1)))
    values = st.integers(0, 1000) | st.sampled_from([0, 1, 1000])
    rows = draw(
        st.lists(
            st.lists(values, min_size=num_experts, max_size=num_experts),
            min_size=num_layers,
            max_size=num_layers,
        )
    )
    return torch.tensor(rows, dtype=torch.float64), workers, redundant


@settings(max_examples=150, deadline=None)
@given(problems())
def test_plan_properties(problem):
    load, workers, redundant = problem
    num_layers, num_experts = load.shape
    plan, report = plan_placement(load, workers, redundant)
    counts = plan.replica_counts()  # [L, E]
    assert (counts >= 1).all() and (counts <= workers).all()  # every expert placed, one copy per rank at most
    for layer in range(num_layers):
        total = int(counts[layer].sum())
        assert total in (num_experts, num_experts + redundant)  # R copies used (or the round-robin guard)
        per_rank = plan.experts_per_rank()[layer]
        assert int(per_rank.max() - per_rank.min()) <= 1  # slots spread evenly: memory stays balanced
    rr = round_robin(num_layers, num_experts, workers)
    peak, rr_peak = rank_loads(load, plan).max(dim=1).values, rank_loads(load, rr).max(dim=1).values
    assert (peak <= rr_peak + 1e-9).all()  # never worse than round-robin, layer by layer
    assert report.imbalance_after <= report.imbalance_before + 1e-9
    assert plan_placement(load.clone(), workers, redundant) == (plan, report)  # deterministic


def test_replicas_go_to_the_hottest():
    load = torch.tensor([[100.0, 1, 1, 1, 1, 1, 1, 1]])
    plan, report = plan_placement(load, workers=4, redundant=3)
    assert plan.replica_counts()[0].tolist() == [4, 1, 1, 1, 1, 1, 1, 1]
    assert report.imbalance_before > 3.0 and report.imbalance_after < 1.1


def test_balanced_packing_even_slots():
    held = balanced_packing(torch.tensor([9.0, 5, 4, 3, 3, 1]), torch.ones(6, dtype=torch.int64), workers=2)
    assert sorted(map(len, held)) == [3, 3]
    assert sorted(sum([9.0, 5, 4, 3, 3, 1][e] for e in experts) for experts in held) == [12.0, 13.0]


def test_replicate_respects_cap():
    copies = replicate_experts(torch.tensor([10.0, 0.0]), num_slots=4, max_copies=2)
    assert copies.tolist() == [2, 2]


# (stats object, message fragment)
BAD_STATS = (
    ([1, 2], "expected an object"),
    ({"layers": 1, "experts": 2}, "tokens_per_expert"),
    ({"layers": 0, "experts": 2, "tokens_per_expert": []}, "layers=0"),
    ({"layers": 2, "experts": 2, "tokens_per_expert": [[1, 2]]}, "list of 2 rows"),
    ({"layers": 1, "experts": 2, "tokens_per_expert": [[1, 2, 3]]}, "tokens_per_expert[0]"),
    ({"layers": 1, "experts": 2, "tokens_per_expert": [[1, -2]]}, "non-negative"),
    ({"layers": 1, "experts": 2, "tokens_per_expert": [[1, "x"]]}, "non-negative"),
)


@pytest.mark.parametrize("stats, fragment", BAD_STATS)
def test_bad_stats(stats, fragment):
    with pytest.raises(ConfigError) as info:
        parse_stats(stats, "stats.json")
    assert fragment in str(info.value) and str(info.value).startswith("stats.json")


@pytest.mark.parametrize("workers, redundant", ((0, 0), (2, -1), (2, 5)))
def test_bad_arguments(workers, redundant):
    with pytest.raises(ConfigError):
        plan_placement(torch.ones(1, 4), workers, redundant)


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers())
    args = parser.parse_args(["plan-placement", *argv])
    return args.run(args)


def test_cli_round_trip(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    load = (torch.rand(4, 8, generator=g) ** 3 * 1000).round()  # [L=4, E=8], skewed
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"layers": 4, "experts": 8, "tokens_per_expert": load.int().tolist()}))
    out = tmp_path / "placement.yaml"
    assert _run(["--stats", str(stats), "--workers", "4", "--redundant", "4", "-o", str(out)]) == 0
    assert "predicted max/mean rank load" in capsys.readouterr().out
    expected, _ = plan_placement(load, workers=4, redundant=4)
    assert Placement.from_yaml(out, num_layers=4, num_experts=8) == expected
    assert load_config(out).placement.workers == 4


def test_cli_memory_check(tmp_path, tiny_model_dir):
    stats = tmp_path / "stats.json"
    model = ModelConfig.from_pretrained(tiny_model_dir)
    num_layers, num_experts = model.num_hidden_layers, model.num_local_experts
    stats.write_text(
        json.dumps(
            {
                "layers": num_layers,
                "experts": num_experts,
                "tokens_per_expert": [[1] * num_experts] * num_layers,
            }
        )
    )
    argv = [
        "--stats",
        str(stats),
        "--workers",
        "2",
        "-o",
        str(tmp_path / "p.yaml"),
        "--model",
        str(tiny_model_dir),
    ]
    assert _run([*argv, "--memory-per-rank", "1GiB"]) == 0
    assert load_config(tmp_path / "p.yaml").placement.memory_per_rank == 2**30
    with pytest.raises(ConfigError, match="memory_per_rank=1 "):
        _run([*argv, "--memory-per-rank", "1"])


def test_cli_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        _run(["--stats", str(tmp_path / "missing.json"), "--workers", "2", "-o", str(tmp_path / "p.yaml")])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        _run(["--stats", str(tmp_path / "bad.json"), "--workers", "2", "-o", str(tmp_path / "p.yaml")])
