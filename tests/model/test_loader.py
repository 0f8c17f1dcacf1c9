"""Loader error matrix: every defect is a CheckpointError naming the tensor and the file."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_runtime.checkpoint.loader import load_model
from moe_runtime.errors import CheckpointError
from moe_runtime.presets.configs import preset_config
from moe_runtime.presets.init_model import write_checkpoint

EXPERT = "model.layers.1.block_sparse_moe.experts.3.w2.weight"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    single = write_checkpoint(root / "single", preset_config("tiny"), seed=1)
    sharded = write_checkpoint(root / "sharded", preset_config("tiny"), seed=1, max_shard_bytes=400_000)
    return single, sharded


@pytest.fixture
def single(pristine, tmp_path):
    return shutil.copytree(pristine[0], tmp_path / "single")


@pytest.fixture
def sharded(pristine, tmp_path):
    return shutil.copytree(pristine[1], tmp_path / "sharded")


def rewrite(path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def shard_of(ckpt, name):
    return json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][name]


def test_single_and_sharded_load_the_same_weights(pristine):
    a, b = (load_model(p, dtype="float32") for p in pristine)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    assert len(list(pristine[1].glob("model-*-of-*.safetensors"))) > 2


def test_experts_are_stacked_gate_then_up(single):
    model = load_model(single, dtype="float32")
    raw = load_file(single / "model.safetensors")
    moe, I = model.layers[1].block_sparse_moe, model.config.intermediate_size
    p = "model.layers.1.block_sparse_moe.experts.3."
    assert torch.equal(moe.experts.w13[3, :I], raw[p + "w1.weight"])
    assert torch.equal(moe.experts.w13[3, I:], raw[p + "w3.weight"])
    assert torch.equal(moe.experts.w2[3], raw[p + "w2.weight"])


@pytest.mark.parametrize("dtype, expected", [("auto", torch.float32), ("bfloat16", torch.bfloat16),
                                             ("float16", torch.float16)])
def test_dtype_conversion(pristine, dtype, expected):
    model = load_model(pristine[0], dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {expected}


def test_missing_tensor(single):
    rewrite(single / "model.safetensors", lambda t: t.pop(EXPERT))
    with pytest.raises(CheckpointError, match=rf"tensor {EXPERT} is missing \(expected shape \[128, 256\]\)"):
        load_model(single)


def test_unexpected_tensor(single):
    rewrite(single / "model.safetensors", lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor model\.layers\.0\.extra\.weight"):
        load_model(single)


def test_misshapen_tensor(single):
    rewrite(single / "model.safetensors", lambda t: t.update({EXPERT: torch.zeros(128, 255)}))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor {EXPERT} has shape \[128, 255\], "
                                              r"expected \[128, 256\]"):
        load_model(single)


def test_truncated_file(single):
    path = single / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupt safetensors file"):
        load_model(single)


def test_corrupt_header(single):
    path = single / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # inside the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupt safetensors file"):
        load_model(single)


def test_shard_named_in_index_but_absent(sharded):
    shard = shard_of(sharded, EXPERT)
    (sharded / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"shard {shard} \(holding tensor .+\) is missing"):
        load_model(sharded)


def test_tensor_named_in_index_but_absent_from_its_shard(sharded):
    shard = shard_of(sharded, EXPERT)
    rewrite(sharded / shard, lambda t: t.pop(EXPERT))
    with pytest.raises(CheckpointError, match=rf"{shard}: tensor {EXPERT} is named in model\.safetensors\.index"):
        load_model(sharded)


def test_no_weights(single):
    (single / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json found"):
        load_model(single)


def test_bad_config_is_a_checkpoint_error(single):
    cfg = json.loads((single / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (single / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: architectures=\['LlamaForCausalLM'\].*allowed: "
                                              r"\['MixtralForCausalLM', 'Qwen2MoeForCausalLM', 'Qwen3MoeForCausalLM', "
                                              r"'OlmoeForCausalLM'\]"):
        load_model(single)


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json: not found"):
        load_model(tmp_path)
