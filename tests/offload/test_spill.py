"""The quantized spill file of the mmap tier (offload/spill.py): built once per checkpoint and scheme, the
same bits as quantizing at each read, reused by later starts, rebuilt for a changed checkpoint, and never
required (an unwritable directory falls back to quantizing at each read)."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import pytest
import torch

from moe_runtime.checkpoint.files import CheckpointFiles
from moe_runtime.checkpoint.layout import layout_of
from moe_runtime.checkpoint.loader import read_config
from moe_runtime.checkpoint.reader import SafetensorsReader
from moe_runtime.kernels.quant import new_weight
from moe_runtime.offload import spill
from moe_runtime.offload.host_tier import MmapTier


def _reader(model_dir) -> SafetensorsReader:
    cfg = read_config(model_dir)
    layout = layout_of(cfg)
    with CheckpointFiles(model_dir, cfg) as ckpt:
        names = {n: f for n, f in ckpt.location.items() if layout.is_expert_tensor(n)}
    return SafetensorsReader(model_dir, names)


def _experts(tier: MmapTier, cfg, scheme):
    """Every expert as the tier hands it to a slot: [(w13, w2)] in layer, expert order."""
    out = []
    for layer in cfg.moe_layers:
        for e in range(cfg.num_local_experts):
            w13 = new_weight((2 * cfg.intermediate_size, cfg.hidden_size), torch.float32, scheme)
            w2 = new_weight((cfg.hidden_size, cfg.intermediate_size), torch.float32, scheme)
            tier.copy_into(layer, e, w13, w2)
            out.append((w13, w2))
    return out


def _same(a, b) -> bool:
    return all(torch.equal(x.data.view(torch.uint8), y.data.view(torch.uint8)) and torch.equal(x.scale, y.scale)
               for pa, pb in zip(a, b, strict=True) for x, y in zip(pa, pb, strict=True))


@pytest.mark.parametrize("scheme", ("int8", "fp8"))
def test_the_spill_holds_the_bits_quantizing_at_each_read_gives(tiny_model_dir, tmp_path, scheme, monkeypatch):
    cfg = read_config(tiny_model_dir)
    with_spill = MmapTier(_reader(tiny_model_dir), cfg, torch.bfloat16, scheme, str(tmp_path))
    assert with_spill.spill is not None
    (path,) = tmp_path.iterdir()
    assert path.stat().st_size == len(cfg.moe_layers) * cfg.num_local_experts * spill.spill_record_bytes(
        cfg.hidden_size, cfg.intermediate_size)
    monkeypatch.setattr("moe_runtime.offload.host_tier.open_spill", lambda *a: None)
    per_read = MmapTier(_reader(tiny_model_dir), cfg, torch.bfloat16, scheme, str(tmp_path))
    assert per_read.spill is None
    try:
        assert _same(_experts(with_spill, cfg, scheme), _experts(per_read, cfg, scheme))
        # the host-compute path reads through it too
        a, b = with_spill.host_weights(cfg.moe_layers[-1], [5, 2]), per_read.host_weights(cfg.moe_layers[-1], [5, 2])
        assert _same([a[:2]], [b[:2]]) and torch.equal(a[2], b[2])
    finally:
        with_spill.close()
        per_read.close()


def test_the_spill_is_built_once_and_rebuilt_for_a_changed_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    cfg = read_config(tiny_model_dir)
    built = []
    real = spill._build
    monkeypatch.setattr(spill, "_build", lambda *a: built.append(a[0]) or real(*a))
    for _ in range(2):
        MmapTier(_reader(tiny_model_dir), cfg, torch.bfloat16, "int8", str(tmp_path)).close()
    assert len(built) == 1 and [p.name for p in tmp_path.iterdir()] == [built[0].name]
    MmapTier(_reader(tiny_model_dir), cfg, torch.bfloat16, "fp8", str(tmp_path)).close()  # another scheme
    assert len(built) == 2
    files = sorted((tiny_model_dir).glob("*.safetensors"))
    st = files[0].stat()
    try:
        os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the checkpoint changed
        MmapTier(_reader(tiny_model_dir), cfg, torch.bfloat16, "int8", str(tmp_path)).close()
    finally:
        os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert len(built) == 3 and len(list(tmp_path.iterdir())) == 3


def test_16bit_experts_need_no_spill(tiny_model_dir, tmp_path):
    cfg = read_config(tiny_model_dir)
    tier = MmapTier(_reader(tiny_model_dir), cfg, torch.bfloat16, "none", str(tmp_path))
    assert tier.spill is None and list(tmp_path.iterdir()) == []
    tier.close()


def test_an_unwritable_directory_falls_back_to_quantizing_at_each_read(tiny_model_dir, tmp_path, caplog):
    cfg = read_config(tiny_model_dir)
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with caplog.at_level(logging.WARNING):
        tier = MmapTier(_reader(tiny_model_dir), cfg, torch.bfloat16, "int8", str(blocked / "spill"))
    try:
        assert tier.spill is None
        assert "no quantized spill file" in caplog.text and "each miss quantizes" in caplog.text
        reference = MmapTier(_reader(tiny_model_dir), cfg, torch.bfloat16, "int8", str(tmp_path / "ok"))
        assert _same(_experts(tier, cfg, "int8"), _experts(reference, cfg, "int8"))
        reference.close()
    finally:
        tier.close()


def test_a_full_disk_falls_back_too(tiny_model_dir, tmp_path, monkeypatch, caplog):
    cfg = read_config(tiny_model_dir)
    monkeypatch.setattr(spill.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))  # 1000 bytes free
    with caplog.at_level(logging.WARNING):
        tier = MmapTier(_reader(tiny_model_dir), cfg, torch.bfloat16, "int8", str(tmp_path))
    assert tier.spill is None and "GB free there" in caplog.text and list(tmp_path.iterdir()) == []
    tier.close()
