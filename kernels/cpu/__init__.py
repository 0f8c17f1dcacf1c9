"""Native CPU kernels for 16-bit weights and a few rows (decode), built at first use.

    linear(x[M, K], w[N, K]) -> [M, N] in x's dtype      (rounded once from fp32)      small_m_linear.cpp
    linear_fp32(x[M, K], w[N, K]) -> [M, N] float32
    expert_mlp(rows[n, H], w13[2I, H], w2[H, I]) -> [n, H] in rows' dtype   (one expert's SwiGLU MLP)
    moe_fp32(hidden[T, H], w13[S, 2I, H], w2[S, H, I], slots[T, k], weights[T, k]) -> [T, H] float32
    moe_decode(hidden[T, H], gate[E, H], w13, w2, top_k, counts[E]) -> [T, H]        moe_decode.cpp
    attention_decode(x[T, D], w_qkv, w_o, cos, sin, k_cache, v_cache, ...) -> [T, D]  attention_decode.cpp
    rms_norm(x[T, D], w[D], eps, residual=None) -> [T, D]                              rms_norm.cpp

All share the GEMM core in gemv.h (small_m_tiles.h for two or more rows, vec.h for the AVX2 basics;
numerics.h for rounding and SiLU). On AVX512-BF16 CPUs, GEMMs of bf16 or int8 weights with bf16-valued x
take `vdpbf16ps` tiles (dot_bf16.h) from row counts measured on the machine (`dot_bf16_rows`,
`dot_int8_rows`; dispatch.py).

`linear`, `attention_decode` and the MoE ops also take int8 weights (`kernels.quant.QuantizedWeight`s
with int8 data: the values widened in registers, fp32 accumulation, each output column times its row's
scale before the rounding; half the bytes of bf16 read per token). `linear` and the MoE ops take
float8_e4m3fn ones the same way (FP8 checkpoints' experts: each byte widened exactly, vec.h `load8`, and
the `vdpbf16ps` tiles from their own switch point, `dot_fp8_rows`).

w is bfloat16 or float16 with unit stride along K (expert slices w13[s] of stacked tensors qualify); x may
be any float dtype and any row stride. Every product accumulates in fp32 and is rounded where torch rounds
(once per GEMM, to the activation dtype), so results differ from torch's 16-bit GEMMs only by summation
order: most outputs equal, some one 16-bit ulp apart (tests/kernels/test_cpu_linear.py).

Why: on CPUs without native bf16 GEMMs (AVX2 without AVX512-BF16/AMX) torch runs a bf16 GEMM of M rows at
about M GEMVs; this kernel reads each weight once for all M rows (mini's [7168, 1024] w13 on one core of
the 2-core AVX2 EPYC: 1.7x torch's bf16 at M = 1, 4.1x at M = 4, 5.0x at M = 16; bench/cpu_linear.py,
docs/benchmarks.md).

The C++ sources ship as package data and are compiled once per machine with `torch.utils.cpp_extension`
into its cache (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions; about 45 s with g++ 12). Callers
check `available()` first: it is False, with one logged warning, when the CPU lacks AVX2/FMA/F16C or the
build fails (no compiler, no ninja), and callers keep torch's kernels then.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from moe_runtime.kernels.quant import QuantizedWeight

__all__ = [
    "available",
    "has_avx512_bf16",
    "dot_bf16_rows",
    "dot_int8_rows",
    "dot_fp8_rows",
    "linear",
    "linear_fp32",
    "expert_mlp",
    "moe_fp32",
    "moe_decode",
    "attention_decode",
    "rms_norm",
    "dequantize",
    "quantize_into",
    "extension",
]

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = [
    "small_m_linear.cpp",
    "moe_decode.cpp",
    "attention_decode.cpp",
    "rms_norm.cpp",
    "quant.cpp",
]  # + the headers gemv.h, small_m_tiles.h, dot_bf16.h, vec.h, numerics.h
_NAME = "moe_runtime_cpu_small_m"
_FLAGS = ["-O3", "-fopenmp"]  # at::parallel_for is OpenMP in torch's CPU build; AVX2 is per function


@functools.cache
def extension():
    """The compiled module (any CPU; its scalar path needs no AVX2), or None when it cannot be built.

    Cached for the process: one build attempt, one warning.
    """
    try:
        from torch.utils.cpp_extension import load

        log.info("building the native CPU kernels (%s), once per machine", ", ".join(SOURCES))
        return load(
            name=_NAME,
            sources=[str(HERE / s) for s in SOURCES],
            extra_cflags=_FLAGS,
            extra_include_paths=[str(HERE)],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as e:  # no compiler, no ninja, a read-only cache...: keep torch's kernels
        log.warning(
            "native CPU kernels unavailable, using torch's kernels (build failed: %s: %s)",
            type(e).__name__,
            str(e).strip().splitlines()[-1] if str(e).strip() else "",
        )
        return None


@functools.cache
def available() -> bool:
    """True when the kernels are built and this CPU has AVX2, FMA and F16C (checked before building)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        log.warning(
            "native CPU kernels not used: this CPU lacks AVX2 (capability %s)",
            torch.backends.cpu.get_cpu_capability(),
        )
        return False
    ext = extension()
    return ext is not None and ext.has_avx2()


def has_avx512_bf16() -> bool:
    """True when the kernels are available and this CPU has AVX512-BF16 (`vdpbf16ps`: dot_bf16.h)."""
    return available() and extension().has_avx512_bf16()


def dot_bf16_rows(rows: int) -> int:
    """Let the native kernels' GEMMs of bf16 weights take the AVX512-BF16 tiles (dot_bf16.h) from `rows`
    rows of x on (0: never, the default), for the whole process; returns the previous value. The row count
    comes from measurement on the machine (dispatch.py `plan_dot_bf16`). A no-op without those kernels."""
    if not has_avx512_bf16():
        return 0
    return extension().set_dot_bf16_min_rows(rows)


def dot_int8_rows(rows: int) -> int:
    """`dot_bf16_rows` for the GEMMs of int8 weights (`QuantizedWeight`s), a switch point of their own: the
    same AVX512-BF16 tiles, each 32 int8 values widened to bf16 in registers (exact), against bf16 x; the row
    scale applied after the sum as on the AVX2 path. Measured by dispatch.py `plan_dot_8bit`; returns the
    previous value; a no-op without those kernels."""
    if not has_avx512_bf16():
        return 0
    return extension().set_dot_int8_min_rows(rows)


def dot_fp8_rows(rows: int) -> int:
    """`dot_bf16_rows` for the GEMMs of float8_e4m3fn weights: the same tiles, each 32 bytes widened to bf16
    in registers (exact, dot_bf16.h `DotWeights<Float8_e4m3fn>`), a switch point of their own (measured by
    dispatch.py `plan_dot_8bit`); returns the previous value; a no-op without those kernels."""
    if not has_avx512_bf16():
        return 0
    return extension().set_dot_fp8_min_rows(rows)


def linear_fp32(x: torch.Tensor, w: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    """x [M, K] (any float dtype) @ w[N, K]^T -> [M, N] float32. Needs `available()`.

    w: bf16 or fp16, or an int8 / float8_e4m3fn `QuantizedWeight` (output column n times its row scale,
    once, after the fp32 sum: `w.dequantize(float32)`'s product up to summation order)."""
    if isinstance(w, QuantizedWeight):
        return extension().linear_fp32(x, w.data, scale=w.scale)
    return extension().linear_fp32(x, w)


def linear(x: torch.Tensor, w: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    """`linear_fp32` rounded once to x's dtype: [M, N]."""
    return linear_fp32(x, w).to(x.dtype)


EIGHT_BIT = (torch.int8, torch.float8_e4m3fn)  # the QuantizedWeight formats the native kernels take: all


def _split(w13, w2) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(w13 values, w2 values, the scales as keyword arguments: none for 16-bit weights)."""
    return _pair(w13, w2, "s13", "s2")


def _pair(a, b, scale_a: str, scale_b: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Two weights of one format: (values, values, their scales under the given keyword names, if 8-bit)."""
    if isinstance(a, QuantizedWeight):
        if not isinstance(b, QuantizedWeight) or a.dtype not in EIGHT_BIT or b.dtype != a.dtype:
            raise TypeError(f"native CPU kernels take 16-bit weights or 8-bit ones of one format (int8, "
                            f"float8_e4m3fn), got {a.dtype} and {b.dtype}")
        return a.data, b.data, {scale_a: a.scale, scale_b: b.scale}
    if isinstance(b, QuantizedWeight):
        raise TypeError(f"both weights must be 16-bit or both 8-bit, got {a.dtype} and {b.dtype}")
    return a, b, {}


def expert_mlp(rows: torch.Tensor, w13: torch.Tensor | QuantizedWeight, w2: torch.Tensor | QuantizedWeight
               ) -> torch.Tensor:
    """w2 @ (silu(w1 @ x) * (w3 @ x)) for one expert: rows [n, H]; w13 [2I, H]; w2 [H, I] -> [n, H].

    In rows' dtype, rounded where the torch backend rounds (`torch_moe._expert_mlp`: each GEMM's result,
    SiLU, the product); only the GEMMs' summation order differs. int8 weights: see the module docstring.
    """
    w13, w2, scales = _split(w13, w2)
    return extension().expert_mlp(rows, w13, w2, **scales)


def moe_fp32(
    hidden: torch.Tensor, w13: torch.Tensor | QuantizedWeight, w2: torch.Tensor | QuantizedWeight,
    slots: torch.Tensor, weights: torch.Tensor,
) -> torch.Tensor:
    """A MoE layer in one native call, each expert group through `expert_mlp`; meant for decode.

    hidden [T, H]; w13 [S, 2I, H]; w2 [S, H, I] (16-bit); slots [T, k] integer slot of each (token, k)
    pair, -1 = not resident (contributes zero); weights [T, k] fp32. Returns [T, H] float32: each token's
    k weighted expert outputs summed in k order, not rounded. Example (T=1, k=2, slots [[3, -1]],
    weights [[0.7, 0.3]]): 0.7 * expert_3(hidden[0]); the dropped pair adds nothing.
    """
    w13, w2, scales = _split(w13, w2)
    return extension().moe_fp32(hidden, w13, w2, slots, weights, **scales)


def moe_decode(
    hidden: torch.Tensor,
    gate: torch.Tensor,
    w13: torch.Tensor | QuantizedWeight,
    w2: torch.Tensor | QuantizedWeight,
    top_k: int,
    counts: torch.Tensor,
) -> torch.Tensor:
    """A whole sparse MoE block for a few tokens in one native call: route, then `moe_fp32`, rounded once.

    hidden [T, H] (16-bit, or fp32 values); gate [E, H] the router's weight; w13 [E, 2I, H], w2 [E, H, I]
    (16-bit, or int8 / float8_e4m3fn `QuantizedWeight`s; contiguous, every expert resident); counts [E] int64,
    incremented in place by the tokens
    routed to each expert. Routing as `reference.route_reference` (router logits rounded to hidden's dtype,
    fp32 softmax, top-k with ties to the lower id, renormalized). Returns [T, H] in hidden's dtype.
    """
    w13, w2, scales = _split(w13, w2)
    return extension().moe_decode(hidden, gate, w13, w2, top_k, counts, **scales)


def attention_decode(
    x: torch.Tensor,
    w_qkv: torch.Tensor | QuantizedWeight,
    w_o: torch.Tensor | QuantizedWeight,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    n_heads: int,
    n_kv_heads: int,
    sliding_window: int | None,
) -> torch.Tensor:
    """The attention block of T one-token queries (each its own sequence) in one native call.

    x [T, D] (normalized hidden states, 16-bit); w_qkv [(H + 2 KVH) Dh, D] (q, k, v weights stacked);
    w_o [D, H Dh] (both x's dtype, or both int8 `QuantizedWeight`s: `model.quantize_dense`); cos, sin [T, Dh]
    (RoPE, x's dtype); k_cache, v_cache [num_blocks, block_size, KVH, Dh]
    (written at slot_mapping [T]); block_tables [T, W] and context_lens [T] (cached + this token) as in
    `model.attention.AttentionMetadata`. Returns o_proj(attention) [T, D] in x's dtype; the same rounding
    points as `Attention` with `attention_fp32`, another summation order.
    """
    window = -1 if sliding_window is None else sliding_window
    w_qkv, w_o, scales = _pair(w_qkv, w_o, "s_qkv", "s_o")
    return extension().attention_decode(
        x, w_qkv, w_o, cos, sin, k_cache, v_cache, slot_mapping, block_tables, context_lens,
        n_heads, n_kv_heads, window, **scales,
    )  # fmt: skip


def dequantize(w: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """`w.dequantize(dtype)` (the same bits) for int8 or float8_e4m3fn `w` on the CPU in one native pass
    (torch converts FP8 one element at a time there); other `w` (on a GPU, not contiguous, no native kernels)
    through torch."""
    native = w.dtype in (torch.int8, torch.float8_e4m3fn) and w.device.type == "cpu" and w.data.is_contiguous()
    if not native or not available():
        return w.dequantize(dtype)
    return extension().dequantize(w.data, w.scale.contiguous(), dtype)


def quantize_into(w: torch.Tensor, data: torch.Tensor, scale: torch.Tensor) -> bool:
    """`kernels.quant.quantize_into` (the same bits) in one native pass over contiguous CPU tensors: w
    [..., N, K] bf16 / fp16 / fp32 into int8 or float8_e4m3fn `data` and fp32 row scales `scale` [..., N].
    Returns False, doing nothing, where the native kernels cannot (then torch's ops do it)."""
    native = (available() and w.device.type == data.device.type == scale.device.type == "cpu"
              and w.dtype in (torch.bfloat16, torch.float16, torch.float32)
              and w.is_contiguous() and data.is_contiguous() and scale.is_contiguous())
    if native:
        extension().quantize_into(w, data, scale)
    return native


def rms_norm(
    x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """`model.layers.RMSNorm` of x [T, D] with weight w [D] (one dtype, contiguous) -> [T, D].

    With `residual` [T, D]: first residual += x in place (rounded to the dtype, as `h = h + x`), then the
    new residual is normalized. Example: h = embed(ids); x = rms_norm(h, w1, eps); ...;
    x = rms_norm(attn_out, w2, eps, residual=h) leaves h = h + attn_out and returns its norm.
    """
    return extension().rms_norm(x, w, eps, residual)
