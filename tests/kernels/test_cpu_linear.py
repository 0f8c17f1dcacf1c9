"""The native small-M CPU linear (kernels/cpu) against an fp32 reference on awkward shapes.

Tolerance: both sides accumulate in fp32 from the same 16-bit inputs, only the summation order differs,
so `linear_fp32` matches `x.float() @ w.float().T` within fp32 rounding of K products (atol 1e-4 for
inputs randn/10, |y| < 1). `linear` rounds that once to 16 bits: within one ulp of the reference rounded
once (atol 2e-2 as STYLE.md asks of 16-bit kernels; in practice a bf16 ulp at |y| < 1, <= 2**-8).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_runtime.kernels import cpu

# Skipped only where the CPU lacks AVX2; with AVX2 a failed build fails `test_builds_where_avx2_exists`.
HAS_AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
pytestmark = pytest.mark.skipif(not HAS_AVX2, reason="the native CPU kernels run only on AVX2 CPUs")

ROWS = (1, 2, 3, 4, 7, 16, 33)
# N, K: neither a multiple of the vector width (8) nor of the register blocks (4 and 8 rows), and one each
NK = ((37, 100), (1, 9), (64, 64), (19, 7), (260, 1031))
DTYPES = (torch.bfloat16, torch.float16)


def test_builds_where_avx2_exists():
    assert cpu.available(), "AVX2 CPU but the native kernels did not build: see the logged warning"


def _inputs(M: int, N: int, K: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=g) / 10).to(dtype)
    w = (torch.randn(N, K, generator=g) / 10).to(dtype)
    return x, w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, K", NK)
@pytest.mark.parametrize("M", ROWS)
def test_linear_fp32_matches_fp32_reference(M, N, K, dtype):
    x, w = _inputs(M, N, K, dtype)
    want = x.float() @ w.float().T  # [M, N]
    got = cpu.linear_fp32(x, w)
    assert got.dtype == torch.float32 and got.shape == (M, N)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    simd_off = cpu.extension().linear_fp32(x, w, simd=False)  # the scalar fallback, same contract
    torch.testing.assert_close(simd_off, want, atol=1e-4, rtol=0)


# Every register-tile path of gemv.h: M = 1 (GEMV in 3 streams, N = 67 leaving one row over); K <= 2048: M = 2 and 4
# (2x5 tiles), 3k, 3k + 1 (last 4 rows as two 2-row tiles), 3k + 2 (x permuted, bf16 peels k < 16);
# K > 2048: 3x4 blocks. K: whole 16s, an 8 tail, a scalar tail, both, under 16, under 8, the boundary.
# N = 67: a remainder for the 3-, 5- and 8-row tiles and the 16- and 30-row tasks.
ALL_ROWS = tuple(range(1, 34))
K_TAILS = (16, 24, 31, 15, 7, 2048, 2050, 3001)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", K_TAILS)
@pytest.mark.parametrize("M", ALL_ROWS)
def test_every_row_count_and_k_tail(M, K, dtype):
    x, w = _inputs(M, 67, K, dtype, seed=M)
    want = x.float() @ w.float().T  # [M, N]
    atol = 1e-4 if K < 1024 else 3e-4  # fp32 rounding of K products of |x w| < 0.2 (inputs randn/10)
    torch.testing.assert_close(cpu.linear_fp32(x, w), want, atol=atol, rtol=0)


@pytest.mark.parametrize("K", (1100, 2200))
@pytest.mark.parametrize("M", (1, 4, 7))
def test_strided_rows_and_many_threads(M, K):
    """Column slices as x (row stride > K) and two threads splitting N (30-row tasks, 16 for M = 1)."""
    x, w = _inputs(M, 131, K, torch.bfloat16)
    wide = torch.zeros(M, K + 100)
    wide[:, 40 : 40 + K] = x.float()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = cpu.linear_fp32(wide[:, 40 : 40 + K], w)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(got, x.float() @ w.float().T, atol=3e-4, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", ROWS)
def test_linear_rounds_once_to_the_activation_dtype(M, dtype):
    x, w = _inputs(M, 260, 1031, dtype)
    got = cpu.linear(x, w)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), (x.float() @ w.float().T).to(dtype).float(), atol=2e-2, rtol=0)


def test_fp32_activations_and_strided_rows():
    """x may be fp32, and its rows may be strided (a column slice); non-unit stride along K is copied."""
    x, w = _inputs(5, 37, 100, torch.bfloat16)
    wide = torch.randn(5, 300)
    wide[:, 50:150] = x.float()
    sliced = wide[:, 50:150]  # [5, 100], row stride 300
    torch.testing.assert_close(cpu.linear_fp32(sliced, w), x.float() @ w.float().T, atol=1e-4, rtol=0)
    transposed = x.float().T.contiguous().T  # [5, 100], stride along K = 5
    torch.testing.assert_close(cpu.linear_fp32(transposed, w), x.float() @ w.float().T, atol=1e-4, rtol=0)


def test_weight_slices_of_stacked_experts():
    """w13[s] of a stacked [S, 2I, H] tensor is a valid weight: no copy, the right rows."""
    g = torch.Generator().manual_seed(1)
    stacked = (torch.randn(3, 24, 40, generator=g) / 10).bfloat16()
    x = (torch.randn(4, 40, generator=g) / 10).bfloat16()
    for s in range(3):
        torch.testing.assert_close(
            cpu.linear_fp32(x, stacked[s]), x.float() @ stacked[s].float().T, atol=1e-4, rtol=0
        )


def test_empty_shapes():
    x, w = _inputs(0, 8, 16, torch.bfloat16)
    assert cpu.linear_fp32(x, w).shape == (0, 8)
    x, w = _inputs(3, 0, 16, torch.bfloat16)
    assert cpu.linear_fp32(x, w).shape == (3, 0)


@pytest.mark.parametrize(
    "bad, match",
    (
        (lambda x, w: (x, w.float()), "w must be bfloat16, float16, int8 or float8_e4m3fn"),
        (lambda x, w: (x, w.T.contiguous().T), "unit stride along K"),
        (lambda x, w: (x[:, :-1], w), "disagree on K"),
        (lambda x, w: (x[None], w), r"x must be \[M, K\]"),
    ),
)
def test_bad_inputs_are_rejected(bad, match):
    x, w = _inputs(2, 16, 24, torch.bfloat16)
    with pytest.raises(RuntimeError, match=match):
        cpu.linear_fp32(*bad(x, w))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", (1, 3, 33))
def test_expert_mlp_rounds_where_the_torch_backend_rounds(n, dtype):
    """Same rounding points as the torch backend's 16-bit expert (each GEMM's result, SiLU and the product
    in 16 bits), only the GEMM summation order differs: equal but for an ulp here and there (rtol 2**-7,
    one bf16 ulp), and within STYLE.md's 2e-2 of the all-fp32 SwiGLU."""
    g = torch.Generator().manual_seed(2)
    H, I = 72, 50  # noqa: E741
    rows = torch.randn(n, H, generator=g).to(dtype)
    w13 = (torch.randn(2 * I, H, generator=g) / 10).to(dtype)
    w2 = (torch.randn(H, I, generator=g) / 10).to(dtype)
    got = cpu.expert_mlp(rows, w13, w2)
    assert got.dtype == dtype
    h13 = F.linear(rows, w13)  # [n, 2I] 16-bit: torch_moe._expert_mlp below its upcast
    want = F.linear(F.silu(h13[:, :I]) * h13[:, I:], w2)  # [n, H]
    torch.testing.assert_close(got.float(), want.float(), atol=1e-5, rtol=2**-7)
    h = rows.float() @ w13.float().T  # [n, 2I]
    fp32 = (F.silu(h[:, :I]) * h[:, I:]) @ w2.float().T  # [n, H]
    torch.testing.assert_close(got.float(), fp32, atol=2e-2, rtol=0)


def test_build_failure_falls_back_with_one_warning(monkeypatch, caplog):
    """No compiler (or any build error): `available()` is False with one warning, nothing raises."""
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    cpu.extension.cache_clear()
    cpu.available.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="moe_runtime.kernels.cpu"):
            assert not cpu.available() and not cpu.available()
        warnings = [r for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and "Ninja is required" in warnings[0].getMessage()
    finally:
        cpu.extension.cache_clear()
        cpu.available.cache_clear()
        monkeypatch.undo()
    assert cpu.available()
