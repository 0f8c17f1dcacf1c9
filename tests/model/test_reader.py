"""SafetensorsReader holds one file descriptor per file, however many tensors it reads (a checkpoint of 128
experts per layer has thousands), and closes them all."""

from __future__ import annotations

import os

import torch

from moe_runtime.checkpoint.files import CheckpointFiles
from moe_runtime.checkpoint.reader import SafetensorsReader
from moe_runtime.config import ModelConfig
from moe_runtime.presets.configs import preset_config
from moe_runtime.presets.init_model import write_checkpoint


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_one_fd_per_file(tmp_path):
    hf = preset_config("tiny-olmoe", num_experts=32, num_experts_per_tok=4)
    ckpt = write_checkpoint(tmp_path / "m", hf, seed=0, max_shard_bytes=1 << 20)
    with CheckpointFiles(ckpt, ModelConfig.from_hf(hf)) as files:
        location = files.location
    before = open_fds()
    reader = SafetensorsReader(ckpt, location)
    assert open_fds() - before == len(set(location.values())) < len(location)
    name = next(iter(location))
    assert torch.equal(reader.get(name), reader.get(name))
    reader.close()
    assert open_fds() == before
