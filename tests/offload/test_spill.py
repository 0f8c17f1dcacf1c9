"""The quantized spill file of the mmap tier (offload/spill.py): built once per checkpoint and scheme, the
same bits as quantizing at each read, reused by later starts, rebuilt for a changed checkpoint, and never
required (an unwritable directory falls back to quantizing at each read). Each file records the checkpoint
it came from, so `moe-runtime cache` can tell current files from stale ones and prune only the latter."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from moe_runtime.checkpoint.files import CheckpointFiles
from moe_runtime.checkpoint.layout import layout_of
from moe_runtime.checkpoint.loader import read_config
from moe_runtime.checkpoint.reader import SafetensorsReader
from moe_runtime.cli import main
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
    (path,) = tmp_path.glob("*.bin")
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
    assert len(built) == 1 and [p.name for p in tmp_path.glob("*.bin")] == [built[0].name]
    MmapTier(_reader(tiny_model_dir), cfg, torch.bfloat16, "fp8", str(tmp_path)).close()  # another scheme
    assert len(built) == 2
    files = sorted((tiny_model_dir).glob("*.safetensors"))
    st = files[0].stat()
    try:
        os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the checkpoint changed
        MmapTier(_reader(tiny_model_dir), cfg, torch.bfloat16, "int8", str(tmp_path)).close()
    finally:
        os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert len(built) == 3 and len(list(tmp_path.glob("*.bin"))) == 3


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


def _build_spill(model_dir, spill_dir, scheme: str = "int8"):
    MmapTier(_reader(model_dir), read_config(model_dir), torch.bfloat16, scheme, str(spill_dir)).close()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_spill_file_records_its_checkpoint_and_turns_stale_when_it_changes(tiny_model_dir, tmp_path):
    _build_spill(tiny_model_dir, tmp_path)
    (current,) = spill.list_spills(tmp_path)
    assert current.state is spill.SpillState.CURRENT and current.why == ""
    assert current.scheme == "int8" and current.checkpoint == str(tiny_model_dir.resolve())
    assert current.nbytes > current.path.stat().st_size, "the record counts too"
    shard = sorted(tiny_model_dir.glob("*.safetensors"))[0]
    st = shard.stat()
    try:
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the checkpoint changed
        (stale,) = spill.list_spills(tmp_path)
        assert stale.state is spill.SpillState.STALE and stale.why == f"{shard.resolve()} changed since"
        _build_spill(tiny_model_dir, tmp_path)  # the next start builds the new one beside it
        states = {f.path.name: f.state for f in spill.list_spills(tmp_path)}
        assert sorted(s.value for s in states.values()) == ["current", "stale"]
        gone = spill.prune(spill.list_spills(tmp_path))
        assert [f.path for f in gone] == [stale.path] and not stale.path.exists()
        left = sorted(p.name for p in tmp_path.iterdir())
        assert len(left) == 2 and all(name.startswith(left[0]) for name in left), "the current file and its record"
    finally:
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_prune_deletes_interrupted_builds_never_a_live_one_and_unrecorded_files_only_with_all(tmp_path):
    partial = tmp_path / f"experts-int8-{'a' * 20}.bin.{_dead_pid()}.tmp"
    building = tmp_path / f"experts-int8-{'b' * 20}.bin.{os.getpid()}.tmp"  # this process: alive
    unrecorded = tmp_path / f"experts-fp8-{'c' * 20}.bin"
    old_format = tmp_path / f"experts-int8-{'d' * 20}.bin"
    for p in (partial, building, unrecorded, old_format):
        p.write_bytes(b"x" * 100)
    (tmp_path / f"{old_format.name}.json").write_text(json.dumps(
        {"format": spill.FORMAT - 1, "scheme": "int8", "checkpoint": str(tmp_path), "files": {}}))
    (tmp_path / "unrelated.txt").write_text("not ours")
    files = {f.path: f for f in spill.list_spills(tmp_path)}
    assert {p: f.state for p, f in files.items()} == {
        partial: spill.SpillState.PARTIAL, building: spill.SpillState.BUILDING,
        unrecorded: spill.SpillState.UNRECORDED, old_format: spill.SpillState.STALE}
    assert files[old_format].why == f"format {spill.FORMAT - 1}, this moe-runtime writes {spill.FORMAT}"
    assert sorted(f.path.name for f in spill.prune(list(files.values()))) == sorted([partial.name, old_format.name])
    assert not (tmp_path / f"{old_format.name}.json").exists()
    assert [f.path for f in spill.prune(spill.list_spills(tmp_path), tuple(spill.SpillState))] == [unrecorded]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([building.name, "unrelated.txt"])


def test_the_cache_command_lists_and_prunes(tiny_model_dir, tmp_path, capsys):
    spills, plans = tmp_path / "spills", tmp_path / "plans"
    _build_spill(tiny_model_dir, spills)
    partial = spills / f"experts-int8-{'a' * 20}.bin.{_dead_pid()}.tmp"
    partial.write_bytes(b"x" * 100)
    sets = ["--set", f"offload.spill_dir={json.dumps(str(spills))}", "--set",
            f"engine.cpu_plan_dir={json.dumps(str(plans))}"]
    assert main(["cache", *sets]) == 0
    out = capsys.readouterr().out
    assert f"quantized spill files in {spills}: 2" in out
    assert f"int8 from {tiny_model_dir.resolve()}  current" in out and "partial: process " in out
    assert "`moe-runtime cache prune` deletes the 1 stale or partial one(s)" in out
    assert f"CPU kernel plans in {plans}: 0" in out
    assert main(["cache", "prune", "--dry-run", *sets]) == 0
    assert f"would delete {partial}" in capsys.readouterr().out and partial.exists()
    assert main(["cache", "prune", *sets]) == 0
    assert "deleted 1 spill file(s)" in capsys.readouterr().out and not partial.exists()
    assert main(["cache", "prune", "--all", *sets]) == 0
    assert "deleted 1 spill file(s)" in capsys.readouterr().out and list(spills.iterdir()) == []


def test_the_cache_command_refuses_prune_flags_without_prune(capsys):
    with pytest.raises(SystemExit) as e:
        main(["cache", "--all"])
    assert e.value.code == 2 and "--all and --dry-run go with `prune`" in capsys.readouterr().err
