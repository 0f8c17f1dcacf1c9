"""Planner properties (hypothesis), the batched steps against per-row references, plans over nodes, and the
plan-placement command end to end."""

from __future__ import annotations

import argparse
import doctest
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_runtime.cluster import planner
from moe_runtime.cluster.expert_load import rank_loads
from moe_runtime.cluster.placement_config import placement_from_yaml
from moe_runtime.cluster.placement_memory import rank_bytes
from moe_runtime.cluster.planner import (
    balanced_packing,
    plan_placement,
    rebalance_hierarchical,
    refine,
    replicate_experts,
    round_robin,
)
from moe_runtime.commands import plan_placement as command
from moe_runtime.config import ModelConfig, load_config
from moe_runtime.errors import ConfigError


def test_doctests():
    assert doctest.testmod(planner).failed == 0


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
    packed, ok = balanced_packing(torch.tensor([[9.0, 5, 4, 3, 3, 1]]), capacity=torch.tensor([[3, 3]]))
    held = [[e for e in rank if e >= 0] for rank in packed[0].tolist()]
    assert bool(ok[0]) and sorted(map(len, held)) == [3, 3]
    assert sorted(sum([9.0, 5, 4, 3, 3, 1][e] for e in experts) for experts in held) == [12.0, 13.0]


def test_replicate_respects_cap():
    copies = replicate_experts(torch.tensor([[10.0, 0.0]]), num_slots=4, max_copies=2)
    assert copies.tolist() == [[2, 2]]


# ----------------------------------------------------------------------------------------------------------
# The batched steps against plain per-row loops (integer weights: sums are exact, so ties break alike)
# ----------------------------------------------------------------------------------------------------------
def _pack_reference(weight: list[float], capacity: list[int], labels: list[int]) -> list[list[int]] | None:
    """One row of `balanced_packing`: pack -> labels in fill order, or None where the greedy gets stuck."""
    order = sorted((i for i in range(len(weight)) if labels[i] >= 0), key=lambda i: (-weight[i], i))
    held: list[list[int]] = [[] for _ in capacity]
    load = [0.0] * len(capacity)
    for i in order:
        free = [p for p in range(len(capacity)) if len(held[p]) < capacity[p] and labels[i] not in held[p]]
        if not free:
            return None
        p = min(free, key=lambda p: (load[p], p))
        held[p].append(labels[i])
        load[p] += weight[i]
    return held


def _refine_reference(held: list[list[int]], weight: list[float]) -> list[list[int]]:
    """One row of `refine`: the best swap off the busiest pack, first in (b, i, j) order, until none helps."""
    held = [list(pack) for pack in held]
    while True:
        loads = [sum(weight[e] for e in pack) for pack in held]
        a = max(range(len(held)), key=lambda p: (loads[p], -p))
        best = None
        for b in range(len(held)):
            for i, x in enumerate(held[a]):
                for j, y in enumerate(held[b]):
                    if b == a or x in held[b] or y in held[a]:
                        continue
                    pair_max = max(loads[a] - weight[x] + weight[y], loads[b] + weight[x] - weight[y])
                    if pair_max < loads[a] - 1e-9 and (best is None or pair_max < best[0]):
                        best = (pair_max, b, i, j)
        if best is None:
            return held
        _, b, i, j = best
        held[a][i], held[b][j] = held[b][j], held[a][i]


def _rows(held: torch.Tensor) -> list[list[list[int]]]:  # [X, P, C] -> [X][P] labels, free slots dropped
    return [[[e for e in pack if e >= 0] for pack in row] for row in held.tolist()]


@st.composite
def packings(draw):
    """(weight [X, n], capacity [X, P], labels [X, n]): repeated labels, padding (-1) and ties included."""
    rows, n, packs = draw(st.integers(1, 4)), draw(st.integers(1, 9)), draw(st.integers(1, 4))
    def table(values):  # [rows][n]
        return draw(st.lists(st.lists(values, min_size=n, max_size=n), min_size=rows, max_size=rows))

    labels, weight = table(st.integers(-1, 4)), table(st.integers(0, 9))
    capacity = [[-(-n // packs) + draw(st.integers(0, 1)) for _ in range(packs)] for _ in range(rows)]
    return torch.tensor(weight, dtype=torch.float64), torch.tensor(capacity), torch.tensor(labels)


@settings(max_examples=150, deadline=None)
@given(packings())
def test_batched_packing_and_refine_match_per_row_loops(problem):
    weight, capacity, labels = problem
    held, ok = balanced_packing(weight, capacity, labels)
    for x, got in enumerate(_rows(held)):
        want = _pack_reference(weight[x].tolist(), capacity[x].tolist(), labels[x].tolist())
        assert bool(ok[x]) == (want is not None)
        if want is not None:
            assert got == want
    per_label = torch.arange(1.0, 6.0).pow(2).expand(len(labels), 5)  # [X, 5]: label l weighs (l + 1)^2
    ok_rows = ok.nonzero().flatten()
    refined = _rows(refine(held[ok_rows], per_label[ok_rows]))
    for x, got in zip(ok_rows.tolist(), refined, strict=True):
        assert got == _refine_reference(_rows(held[x : x + 1])[0], per_label[x].tolist())


@settings(max_examples=100, deadline=None)
@given(problems())
def test_flat_plan_matches_per_layer_loops(problem):
    """The batched planner with one node is, layer by layer, replicate -> greedy (or dealt) -> refine."""
    load, workers, redundant = problem
    load = load * 60  # per-copy loads stay integers for up to 6 copies: exact sums
    num_layers, num_experts = load.shape
    holds = rebalance_hierarchical(load, redundant, num_experts, 1, workers)  # [L, E, N]
    assert torch.equal(holds, rebalance_hierarchical(load, redundant, 1, 1, workers))  # one node: groups moot
    for layer in range(num_layers):
        copies = replicate_experts(load[layer : layer + 1], num_experts + redundant, workers)[0].tolist()
        labels = [e for e in range(num_experts) for _ in range(copies[e])]
        per_copy = [float(load[layer, e]) / copies[e] for e in range(num_experts)]
        capacity = [len(labels) // workers + (r < len(labels) % workers) for r in range(workers)]
        held = _pack_reference([per_copy[e] for e in labels], capacity, labels)
        if held is None:  # dealt in turn
            held = [[e for i, e in enumerate(labels) if i % workers == r] for r in range(workers)]
        held = _refine_reference(held, per_copy)
        want = [[e in held[r] for r in range(workers)] for e in range(num_experts)]
        assert holds[layer].tolist() == want


def test_batched_layers_are_independent():
    g = torch.Generator().manual_seed(1)
    load = (torch.rand(5, 8, generator=g) ** 3 * 1000).round()  # [L=5, E=8], skewed
    for num_nodes in (1, 2):
        plan, _ = plan_placement(load, workers=4, redundant=4, num_nodes=num_nodes)
        for layer in range(5):
            alone, _ = plan_placement(load[layer : layer + 1], workers=4, redundant=4, num_nodes=num_nodes)
            assert plan.ranks[layer] == alone.ranks[0]


# ----------------------------------------------------------------------------------------------------------
# Plans over nodes
# ----------------------------------------------------------------------------------------------------------
@st.composite
def node_problems(draw):
    """(load [L, E], workers, redundant, num_nodes) with nodes splitting ranks and experts evenly."""
    num_nodes, ranks_per_node, experts_per_node = (draw(st.integers(1, 3)) for _ in range(3))
    workers, num_experts = num_nodes * ranks_per_node, num_nodes * experts_per_node
    redundant = draw(st.integers(0, num_experts * (ranks_per_node - 1)))
    values = st.integers(0, 1000) | st.sampled_from([0, 1, 1000])
    row = st.lists(values, min_size=num_experts, max_size=num_experts)
    rows = draw(st.lists(row, min_size=1, max_size=3))
    return torch.tensor(rows, dtype=torch.float64), workers, redundant, num_nodes


@settings(max_examples=100, deadline=None)
@given(node_problems())
def test_plan_over_nodes_properties(problem):
    load, workers, redundant, num_nodes = problem
    plan, report = plan_placement(load, workers, redundant, num_nodes=num_nodes)
    ranks_per_node = workers // num_nodes
    assert all(len({r // ranks_per_node for r in reps}) == 1 for layer in plan.ranks for reps in layer)
    assert (plan.replica_counts().sum(dim=1) == load.shape[1] + redundant).logical_or(
        plan.replica_counts().sum(dim=1) == load.shape[1]).all()
    per_rank = plan.experts_per_rank()  # [L, N]
    assert (per_rank.max(dim=1).values - per_rank.min(dim=1).values <= 1).all()
    rr = round_robin(*load.shape, workers)
    assert (rank_loads(load, plan).max(dim=1).values <= rank_loads(load, rr).max(dim=1).values + 1e-9).all()
    assert report.imbalance_after <= report.imbalance_before + 1e-9
    assert plan_placement(load.clone(), workers, redundant, num_nodes=num_nodes) == (plan, report)
    if num_nodes == 1:
        assert (plan, report) == plan_placement(load, workers, redundant)


def test_plan_over_nodes_balances_nodes_then_ranks():
    g = torch.Generator().manual_seed(0)
    load = (torch.rand(4, 16, generator=g) ** 4 * 1000).round() + 1  # [L=4, E=16], a few hot experts
    plan, report = plan_placement(load, workers=8, redundant=8, num_nodes=2)
    node_load = rank_loads(load, plan).view(4, 2, 4).sum(dim=-1)  # [L, M]
    assert (node_load.max(dim=1).values / node_load.mean(dim=1) < 1.01).all()
    assert report.imbalance_before > 2.5 and report.imbalance_after < 1.2
    homes = [{r // 4 for r in reps} for layer in plan.ranks for reps in layer]
    assert all(len(home) == 1 for home in homes)  # an expert's copies never span nodes


def test_groups_stay_on_one_node():
    load = torch.tensor([[9.0, 1, 1, 1, 8, 2, 2, 2], [1.0, 1, 1, 1, 1, 1, 1, 9]])  # [L=2, E=8]
    holds = rebalance_hierarchical(load, redundant=4, num_groups=4, num_nodes=2, workers=4)  # groups of 2
    node_of = holds.view(2, 4, 2, 2, 2).any(dim=-1)  # [L, groups, experts in group, M]
    assert (node_of.sum(dim=-1) == 1).all()  # each expert on one node ...
    assert (node_of[:, :, 0] == node_of[:, :, 1]).all()  # ... the same for both experts of a group
    assert (holds.sum(dim=(1, 2)) == 8 + 4).all()


@pytest.mark.parametrize("workers, redundant", ((0, 0), (2, -1), (2, 5)))
def test_bad_arguments(workers, redundant):
    with pytest.raises(ConfigError):
        plan_placement(torch.ones(1, 4), workers, redundant)


# (workers, num_nodes, redundant, message fragments): nodes must split ranks and experts; R fits one node
BAD_NODES = (
    (4, 3, 0, ("num_nodes=3", "allowed: [1, 2, 4]")),
    (6, 4, 0, ("num_nodes=4", "allowed: [1, 2]")),
    (4, 0, 0, ("num_nodes=0",)),
    (4, 2, 5, ("redundant=5", "0..4", "2 workers per node")),
)


@pytest.mark.parametrize("workers, num_nodes, redundant, fragments", BAD_NODES)
def test_bad_nodes(workers, num_nodes, redundant, fragments):
    with pytest.raises(ConfigError) as info:
        plan_placement(torch.ones(1, 4), workers, redundant, num_nodes=num_nodes)
    for fragment in fragments:
        assert fragment in str(info.value)


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
    assert placement_from_yaml(out, num_layers=4, num_experts=8) == expected
    assert load_config(out).placement.workers == 4


def test_cli_nodes(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    load = (torch.rand(4, 8, generator=g) ** 3 * 1000).round()  # [L=4, E=8], skewed
    stats, out = tmp_path / "stats.json", tmp_path / "placement.yaml"
    stats.write_text(json.dumps({"layers": 4, "experts": 8, "tokens_per_expert": load.int().tolist()}))
    argv = ["--stats", str(stats), "--workers", "4", "--redundant", "4", "-o", str(out)]
    assert _run([*argv, "--nodes", "2"]) == 0
    assert "on 4 workers in 2 nodes" in capsys.readouterr().out
    expected, _ = plan_placement(load, workers=4, redundant=4, num_nodes=2)
    assert placement_from_yaml(out, num_layers=4, num_experts=8) == expected
    assert "--nodes 2" in out.read_text().splitlines()[0]
    with pytest.raises(ConfigError, match=r"num_nodes=3: .* allowed: \[1, 2, 4\]"):
        _run([*argv, "--nodes", "3"])


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
    plan = placement_from_yaml(tmp_path / "p.yaml", num_layers=num_layers, num_experts=num_experts)
    sixteen = [*argv, "--memory-per-rank", str(max(rank_bytes(plan, model)) - 1)]
    with pytest.raises(ConfigError, match="memory_per_rank="):
        _run(sixteen)  # 16-bit experts do not fit one byte under their need
    assert _run([*sixteen, "--quantization", "int8"]) == 0  # 8-bit ones do


def test_cli_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        _run(["--stats", str(tmp_path / "missing.json"), "--workers", "2", "-o", str(tmp_path / "p.yaml")])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        _run(["--stats", str(tmp_path / "bad.json"), "--workers", "2", "-o", str(tmp_path / "p.yaml")])
