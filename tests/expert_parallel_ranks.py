"""The two-rank expert-parallel run of tests/cluster/test_expert_parallel.py: what each spawned rank does.

A module of its own on pytest's pythonpath (tests/), because `torch.multiprocessing.spawn` pickles the
function by module name and a child process cannot import a test module (pytest's importlib mode).
"""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist

from moe_runtime.checkpoint.loader import load_model
from moe_runtime.cluster.expert_parallel import ShardedExpertsBuilder
from moe_runtime.cluster.placement import Placement
from moe_runtime.kernels.attention import AttentionMetadata
from moe_runtime.model.parts import ModelParts

PROMPTS = ([1, 17, 245, 3, 99, 870, 12, 5, 640, 33, 7], [5, 6, 7])


def run_rank(rank: int, world: int, port: int, model_dir: str, placements: list[Placement], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        hidden = []
        for placement in placements:
            model = load_model(model_dir, "float32", "cpu", parts=ModelParts(experts=ShardedExpertsBuilder(placement, rank, dist.group.WORLD)))
            hidden.append(forward(model))
        if rank == 0:
            torch.save(hidden, out)
    finally:
        dist.destroy_process_group()


def forward(model) -> torch.Tensor:
    ids = torch.tensor([t for p in PROMPTS for t in p])
    positions = torch.cat([torch.arange(len(p)) for p in PROMPTS])
    return model(ids, positions, AttentionMetadata.for_prompts([len(p) for p in PROMPTS]))  # [T, D]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
