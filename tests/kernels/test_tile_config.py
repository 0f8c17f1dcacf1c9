"""Tuned tile configs as data: file naming (one format per weight / activation pair), nearest-M lookup,
heuristic default."""

import pytest
import torch

from moe_runtime.kernels.tile_config import (
    TABLE_FORMATS,
    MoeShape,
    TileConfig,
    default_tile_config,
    load_table,
    save_table,
    table_path,
    tile_config_for,
)

SHAPE = MoeShape(num_experts=8, intermediate=14336, dtype=torch.bfloat16, device_name="NVIDIA_H100_80GB_HBM3")
SMALL = TileConfig(block_m=16, block_n=64, block_k=128, group_m=1, num_warps=4, num_stages=4)
MID = TileConfig(block_m=32, block_n=128, block_k=64, group_m=8, num_warps=4, num_stages=3)
BIG = TileConfig(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3)


def test_file_name_follows_the_convention(tmp_path):
    assert table_path(SHAPE, tmp_path).name == "E=8,N=14336,device_name=NVIDIA_H100_80GB_HBM3,dtype=bf16.json"


def test_nearest_m_with_ties_to_the_smaller(tmp_path):
    save_table(table_path(SHAPE, tmp_path), {1: SMALL, 16: MID, 64: BIG})
    picks = {m: tile_config_for(m, 2, SHAPE, tmp_path) for m in (1, 8, 9, 20, 40, 50, 4096)}
    assert picks == {1: SMALL, 8: SMALL, 9: MID, 20: MID, 40: MID, 50: BIG, 4096: BIG}


def test_round_trip(tmp_path):
    path = table_path(SHAPE, tmp_path)
    save_table(path, {512: BIG, 2: SMALL})
    assert load_table(path) == ((2, SMALL), (512, BIG))


def test_no_table_falls_back_to_the_heuristic(tmp_path):
    assert tile_config_for(1, 2, SHAPE, tmp_path) == default_tile_config(1, 2, 8)


def test_heuristic_grows_tiles_with_rows_per_expert():
    decode, mid, prefill = (default_tile_config(m, 2, 8) for m in (1, 256, 4096))
    assert decode.block_m == 16 and decode.block_m <= mid.block_m <= prefill.block_m
    for cfg in (decode, mid, prefill):  # tl.dot needs every block dimension >= 16, powers of two
        assert all(v >= 16 and v & (v - 1) == 0 for v in (cfg.block_m, cfg.block_n, cfg.block_k))


def test_gemm2_tiles_round_trip_and_apply_to_gemm2_only(tmp_path):
    split = TileConfig(128, 128, 64, 8, 8, 3, gemm2=TileConfig(128, 256, 64, 8, 8, 3))
    path = table_path(SHAPE, tmp_path)
    save_table(path, {1: SMALL, 4096: split})
    assert '"gemm2"' in path.read_text() and path.read_text().count('"gemm2"') == 1  # absent where unused
    assert load_table(path) == ((1, SMALL), (4096, split))
    assert split.for_gemm2().block_n == 256 and SMALL.for_gemm2() is SMALL


def test_gemm2_tiles_must_share_block_m():
    with pytest.raises(ValueError, match="block_m=64"):
        TileConfig(64, 128, 64, 8, 8, 3, gemm2=TileConfig(128, 128, 64, 8, 8, 3))


@pytest.mark.parametrize("name", sorted(TABLE_FORMATS))
def test_every_format_names_its_own_file(name, tmp_path):
    dtype, activations = TABLE_FORMATS[name]
    shape = MoeShape(8, 14336, dtype, "NVIDIA_H200", activations)
    assert shape.format == name and table_path(shape, tmp_path).name.endswith(f",dtype={name}.json")


def test_w8a8_tiles_are_not_the_w8a16_ones(tmp_path):
    w8a16 = MoeShape(8, 14336, torch.float8_e4m3fn, "NVIDIA_H200")
    w8a8 = MoeShape(8, 14336, torch.float8_e4m3fn, "NVIDIA_H200", activations=torch.float8_e4m3fn)
    save_table(table_path(w8a16, tmp_path), {1: MID})
    assert tile_config_for(1, 2, w8a16, tmp_path) == MID
    assert tile_config_for(1, 2, w8a8, tmp_path) == default_tile_config(1, 2, 8), "no w8a8 table: the heuristic"


def test_a_pair_without_a_format_is_refused():
    with pytest.raises(ValueError, match="no tuned-table format for weights/activations torch.bfloat16 x "
                                         "torch.float8_e4m3fn"):
        table_path(MoeShape(8, 14336, torch.bfloat16, "cpu", torch.float8_e4m3fn))
