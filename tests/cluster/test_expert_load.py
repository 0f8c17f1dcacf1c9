"""Expert load (cluster/expert_load.py): the stats format the planner reads, rank loads, imbalance."""

from __future__ import annotations

import doctest

import pytest
import torch

from moe_runtime.cluster import expert_load
from moe_runtime.cluster.expert_load import imbalance, mask_loads, parse_stats, rank_loads
from moe_runtime.cluster.placement import Placement
from moe_runtime.errors import ConfigError


def test_doctests():
    assert doctest.testmod(expert_load).failed == 0


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


def test_rank_loads_split_an_expert_over_its_copies():
    plan = Placement(2, (((0,), (0, 1), (1,)), ((0, 1), (0,), (1,))))
    load = torch.tensor([[4.0, 6.0, 1.0], [8.0, 2.0, 0.0]])  # [L=2, E=3]
    assert rank_loads(load, plan).tolist() == [[7.0, 4.0], [6.0, 4.0]]
    assert torch.equal(mask_loads(load, plan.mask()[None])[0], rank_loads(load, plan))  # batched over plans
    total, worst = imbalance(load, plan)
    assert total == pytest.approx((7 + 6) / (5.5 + 5)) and worst == pytest.approx(7 / 5.5)
    assert imbalance(torch.zeros(2, 3), plan) == (1.0, 1.0)  # no load: balanced
