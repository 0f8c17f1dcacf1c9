"""The tuner's search space (bench/tune_fused_moe.py), checked without a GPU: what it would compile."""

import importlib.util
from pathlib import Path

import pytest

from moe_runtime.kernels.tile_config import default_tile_config

_PATH = Path(__file__).parents[2] / "bench" / "tune_fused_moe.py"
_spec = importlib.util.spec_from_file_location("tune_fused_moe", _PATH)
tune = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tune)

ISSUE_M = (1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 4096)


@pytest.mark.parametrize("M", ISSUE_M)
def test_every_candidate_is_launchable(M):
    """Powers of two >= 16 (tl.dot), shared memory within the limit, gemm2 tiles sharing block_m."""
    for cfg in tune.configs_to_try(M, 2, 8):
        for c, gemm in ((cfg, 1), (cfg.for_gemm2(), 2)):
            assert all(v >= 16 and v & (v - 1) == 0 for v in (c.block_m, c.block_n, c.block_k))
            assert tune.smem_bytes(c, gemm) <= tune.SMEM_LIMIT
        assert cfg.for_gemm2().block_m == cfg.block_m


def test_regimes_follow_rows_per_expert():
    decode, middle, prefill = (tune.candidates(m, 2, 8) for m in (16, 64, 4096))  # 4, 16, 1024 rows per expert
    assert {c.block_m for c in decode} == {16}
    assert {c.block_m for c in middle} >= {32, 64}
    assert min(c.block_m for c in prefill) >= 64
    # GEMM 2's own tiles are tried only once experts have 8 rows or more
    assert all(c.gemm2 is None for c in tune.configs_to_try(16, 2, 8))
    assert any(c.gemm2 is not None for c in tune.configs_to_try(64, 2, 8))


def test_heuristic_is_always_tried_first():
    for M in ISSUE_M:
        assert tune.configs_to_try(M, 2, 8)[0] == default_tile_config(M, 2, 8)


def test_gemm1_tiles_never_exceed_two_128x128_accumulators():
    for M in ISSUE_M:
        for cfg in tune.candidates(M, 2, 8):
            assert cfg.block_m * cfg.block_n <= 128 * 128
            assert tune.fits(cfg, gemm=1)
