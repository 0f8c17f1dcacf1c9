// Small-M GEMM tiles (two or more rows of x): y[M, n0:n1] = x[M, K] @ W[n0:n1, K]^T with 16-bit W, fp32
// accumulation, on raw pointers. Entry points: `rows_avx2` (x in permute_x order, K <= kTileMaxK) and
// `rows_blocks` (x in its own order, any K); `gemm` in gemv.h picks one.

#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>

#include "vec.h"

namespace moe_cpu {

// Every accumulator of a register tile set to 0.
template <int MB, int NB>
AVX2_FN inline void zero(__m256 (&acc)[MB][NB]) {
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_ps();
}

// One register block: MB rows of x times NB rows of W, MB * NB accumulators of 8 lanes each. K % 8 tail
// in scalar code after the horizontal sum.
template <int MB, int NB, typename W>
AVX2_FN inline void block(const float* x, int64_t ldx, const W* w, int64_t ldw, float* y, int64_t ldy,
                          int64_t K) {
  __m256 acc[MB][NB];
  zero(acc);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if ((k & 31) == 0) {  // one cache line of each row of the next block: keeps one long prefetch stream
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) _mm_prefetch(reinterpret_cast<const char*>(w + (NB + j) * ldw + k), _MM_HINT_T0);
    }
    __m256 xv[MB];
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) xv[i] = _mm256_loadu_ps(x + i * ldx + k);
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      __m256 wv = load8(w + j * ldw + k);
#pragma GCC unroll 4
      for (int i = 0; i < MB; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      float s = hsum(acc[i][j]);
      for (int64_t kk = k; kk < K; ++kk) s += x[i * ldx + kk] * static_cast<float>(w[j * ldw + kk]);
      y[i * ldy + j] = s;
    }
}

// ----------------------------------------------------------------------------------------------------
// Two or more rows of x (small-M GEMM). Widening dominates here, not memory: a 3 x 4 tile that widens
// with zext + shift runs at 77 GFLOP/s from L1 on one Zen 3 core (3.15 GHz, FMA peak 100), the same
// tile on fp32 weights at 100. So bf16 widens with one AND per 8 weights (a logic op, in place of a
// zext shuffle and a shift): a 32-bit lane of 16 bf16 weights w[k..k+15] holds (w[2i],
// w[2i+1]); masking its low half leaves w[2i+1] as an exact fp32 (the odd elements), and the same mask
// on a load 2 bytes earlier leaves w[2i] (the even ones; at k = 0 a shift instead, to read nothing
// before the row). x is copied once per call into the matching order, per 16 elements [even | odd]
// (`permute_x`). fp16 keeps `vcvtph2ps` and x's own order. Tiles measured from L1 (GFLOP/s, same
// process, best of 30 alternating rounds): 3x3 97, 3x4 93, 2x5 93, 4x2 71, 4x3 68 (spills), 1x6 55;
// the old 3x4 with zext + shift 77, its 1x4 43. (fp16 takes the same tiles; not measured separately.)

template <typename W>
struct Widen;  // 16 weights from p -> lo, hi: fp32 vectors matching x[k..k+7], x[k+8..k+15] of permute_x

template <>
struct Widen<c10::BFloat16> {
  static constexpr bool kEvenOdd = true;
  template <bool kFirst>
  AVX2_FN static inline __m256 lo(const c10::BFloat16* p) {  // w[k + 2i], i < 8
    if (kFirst)
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), 16));
    return _mm256_castsi256_ps(_mm256_and_si256(_mm256_set1_epi32(int(0xFFFF0000u)),
                                                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p - 1))));
  }
  AVX2_FN static inline __m256 hi(const c10::BFloat16* p) {  // w[k + 2i + 1]
    return _mm256_castsi256_ps(_mm256_and_si256(_mm256_set1_epi32(int(0xFFFF0000u)),
                                                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
  }
};

// Weights widened by vec.h's `load8` in x's own order (no even/odd split).
template <typename W>
struct WidenInOrder {
  static constexpr bool kEvenOdd = false;
  template <bool kFirst>
  AVX2_FN static inline __m256 lo(const W* p) { return load8(p); }
  AVX2_FN static inline __m256 hi(const W* p) { return load8(p + 8); }
};

// fp16: F16C `vcvtph2ps`.
template <>
struct Widen<c10::Half> : WidenInOrder<c10::Half> {};

// int8 (quantized experts, kernels/quant.py): sign-extend and convert. Two uops per 8 weights where bf16
// takes one AND, but half the bytes: the GEMV and the smallest M are bound by memory.
template <>
struct Widen<int8_t> : WidenInOrder<int8_t> {};

// float8_e4m3fn (FP8 experts): exact, 9 instructions per 8 weights (a byte's fields moved into fp16 bits,
// F16C, a scale, the NaN bytes).
template <>
struct Widen<c10::Float8_e4m3fn> : WidenInOrder<c10::Float8_e4m3fn> {};

// xp[k..k+15] = x[k, k+2, ..., k+14, k+1, k+3, ..., k+15] for each whole 16 of K; the K % 16 tail as is.
AVX2_FN inline void permute_x(const float* x, float* xp, int64_t K) {
  const __m256i idx = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256 a = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + k), idx);      // x0 x2 x4 x6 | x1 x3 x5 x7
    __m256 b = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + k + 8), idx);  // x8 .. x14 | x9 .. x15
    _mm256_storeu_ps(xp + k, _mm256_permute2f128_ps(a, b, 0x20));
    _mm256_storeu_ps(xp + k + 8, _mm256_permute2f128_ps(a, b, 0x31));
  }
  for (; k < K; ++k) xp[k] = x[k];
}

// 16 elements of K for a tile: x rows held in registers, weights widened one row at a time.
template <int MB, int NB, bool kFirst, typename W>
AVX2_FN inline void tile_step(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t k, __m256 (&acc)[MB][NB]) {
  __m256 xv[MB];
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i) xv[i] = _mm256_loadu_ps(x + i * ldx + k);
#pragma GCC unroll 8
  for (int j = 0; j < NB; ++j) {
    const __m256 wv = Widen<W>::template lo<kFirst>(w + j * ldw + k);
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i) xv[i] = _mm256_loadu_ps(x + i * ldx + k + 8);
#pragma GCC unroll 8
  for (int j = 0; j < NB; ++j) {
    const __m256 wv = Widen<W>::hi(w + j * ldw + k);
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
  }
}

// y[MB, NB] = x[MB, :K] @ w[NB, :K]^T, x in permute_x order; the K % 16 tail 8 at a time in x's own
// order, then scalar. Output column j goes to y[i * ldy + j * ycs]; `pf` is where the next tile's rows
// start relative to this tile's (prefetched one cache line ahead of the loads).
template <int MB, int NB, typename W>
AVX2_FN inline void tile(const float* x, int64_t ldx, const W* w, int64_t ldw, float* y, int64_t ldy, int64_t K,
                         int64_t ycs, int64_t pf) {
  __m256 acc[MB][NB];
  zero(acc);
  int64_t k = 0;
  if (K >= 16) {
    tile_step<MB, NB, true>(x, ldx, w, ldw, k, acc);
    k = 16;
  }
  for (; k + 16 <= K; k += 16) {
    if ((k & 31) == 0) {  // one cache line of each row of the next tile (first pass over the weights)
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) _mm_prefetch(reinterpret_cast<const char*>(w + j * ldw + pf + k), _MM_HINT_T0);
    }
    tile_step<MB, NB, false>(x, ldx, w, ldw, k, acc);
  }
  for (; k + 8 <= K; k += 8) {
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      const __m256 wv = load8(w + j * ldw + k);
#pragma GCC unroll 4
      for (int i = 0; i < MB; ++i) acc[i][j] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * ldx + k), wv, acc[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      float s = hsum(acc[i][j]);
      for (int64_t kk = k; kk < K; ++kk) s += x[i * ldx + kk] * static_cast<float>(w[j * ldw + kk]);
      y[i * ldy + j * ycs] = s;
    }
}

// All M rows of x, 3 at a time then a remainder of 2 or 4 rows as 2-row tiles, against NB weight rows
// (ldw apart; outputs ycs apart): the NB rows stay in L1 while every M block passes over them, so W
// streams from memory once.
template <int NB, typename W>
AVX2_FN inline void m_blocks(const float* x, int64_t ldx, const W* w, int64_t ldw, float* y, int64_t ldy, int64_t M,
                             int64_t K, int64_t ycs = 1, int64_t pf = -1) {
  if (pf < 0) pf = NB * ldw;  // neighbouring rows: the next tile's rows follow these
  const int64_t m3 = M % 3 == 1 ? M - 4 : M - M % 3;  // rows in 3-row blocks
  for (int64_t m = 0; m < m3; m += 3) tile<3, NB>(x + m * ldx, ldx, w, ldw, y + m * ldy, ldy, K, ycs, pf);
  for (int64_t m = m3; m < M; m += 2) tile<2, NB>(x + m * ldx, ldx, w, ldw, y + m * ldy, ldy, K, ycs, pf);
}

// m_blocks over NB equal slices of the weight rows [n0, n1): tile i takes row i of every slice, so the
// weights stream from NB places at once (as `rows_dot_streams`); returns the first row left over.
// Against neighbouring rows, w13 [7168, 1024] from memory, one core, three alternating runs of two
// builds (GFLOP/s): M = 2 22-24 -> 34-36, M = 4 35-38 -> 39-43, M = 8 and 16 level within the noise
// (47-63 both ways); memory-bound small M gains, compute-bound M neither gains nor loses.
template <int NB, typename W>
AVX2_FN inline int64_t m_blocks_streams(const float* x, int64_t ldx, const W* w, int64_t ldw, float* y, int64_t ldy,
                                        int64_t M, int64_t n0, int64_t n1, int64_t K) {
  const int64_t per = (n1 - n0) / NB;
  for (int64_t i = 0; i < per; ++i)
    m_blocks<NB>(x, ldx, w + (n0 + i) * ldw, per * ldw, y + n0 + i, ldy, M, K, per, ldw);
  return n0 + NB * per;
}

// All M >= 2 rows (x in permute_x order, K <= kTileMaxK) against weight rows [n0, n1). Register tiles
// (16 ymm): 3x3 and 2x3 (9 or 6 accumulators + x rows + 1 weight + the mask); 2x5 where M is 2 or 4,
// which would otherwise run 2-row tiles of 3 only. 3x4 spills here (17 registers with the mask) and
// lost 0-10% to the old kernel from memory. Against the old kernel (`rows_blocks`) on w13 [7168, 1024]
// from memory (256 MiB of copies), one core, medians of 10 alternating rounds, same process, two runs:
// M = 2 1.15-1.25x, 4 1.15x, 8 1.1-1.15x, 16 1.0-1.1x, 32 1.05-1.15x (w13 M = 32: 51 vs 49 GFLOP/s on a
// loaded machine, 74 vs 64 on a quiet one). x rows are 4 KiB here: a 3-row block stays in L1.
template <typename W>
AVX2_FN void rows_avx2(const float* x, int64_t ldx, const W* w, int64_t ldw, float* y, int64_t ldy, int64_t M,
                       int64_t n0, int64_t n1, int64_t K) {
  int64_t n = M == 2 || M == 4 ? m_blocks_streams<5>(x, ldx, w, ldw, y, ldy, M, n0, n1, K)
                                : m_blocks_streams<3>(x, ldx, w, ldw, y, ldy, M, n0, n1, K);
  if (M == 2 || M == 4)
    for (; n + 5 <= n1; n += 5) m_blocks<5>(x, ldx, w + n * ldw, ldw, y + n, ldy, M, K);
  for (; n + 3 <= n1; n += 3) m_blocks<3>(x, ldx, w + n * ldw, ldw, y + n, ldy, M, K);
  for (; n < n1; ++n) m_blocks<1>(x, ldx, w + n * ldw, ldw, y + n, ldy, M, K);
}

// Rows of x longer than this go through `block` tiles (3x4 in x's own order, zext + shift widening):
// there 3 x rows (12 bytes per k) no longer stay in L1 and are reread from L2 for every tile, and the
// 3x3 tiles' extra x traffic per FMA (10.7 vs 8 bytes) costs more than their cheaper widening saves.
// Measured against `block<3, 4>` from memory, one core, median of 10 alternating rounds: w2
// [1024, 3584] at M = 3..32 0.8-1.0x, Mixtral's [4096, 14336] 0.9-1.0x (M = 2 and 4 on 2x5 tiles:
// 1.0-1.1x, not kept); all rows on 2x5 tiles 0.75-0.95x; M blocks outermost (x in L1, W from L2)
// 0.9-0.95x; K chunks of 256 so all of x stays in L1: 0.8-0.9x at M = 8..32.
constexpr int64_t kTileMaxK = 2048;

inline bool uses_tiles(int64_t M, int64_t K) { return M > 1 && K <= kTileMaxK; }

// All M rows (x in its own order) against weight rows [n0, n1): 4 weight rows at a time, M in blocks
// of three (12 accumulators + 3 x vectors + 1 weight vector = the 16 ymm registers).
template <typename W>
AVX2_FN void rows_blocks(const float* x, int64_t ldx, const W* w, int64_t ldw, float* y, int64_t ldy, int64_t M,
                         int64_t n0, int64_t n1, int64_t K) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const W* wb = w + n * ldw;
    int64_t m = 0;
    for (; m + 3 <= M; m += 3) block<3, 4>(x + m * ldx, ldx, wb, ldw, y + m * ldy + n, ldy, K);
    if (M - m == 2) block<2, 4>(x + m * ldx, ldx, wb, ldw, y + m * ldy + n, ldy, K);
    if (M - m == 1) block<1, 4>(x + m * ldx, ldx, wb, ldw, y + m * ldy + n, ldy, K);
  }
  for (; n < n1; ++n) {
    const W* wb = w + n * ldw;
    int64_t m = 0;
    for (; m + 3 <= M; m += 3) block<3, 1>(x + m * ldx, ldx, wb, ldw, y + m * ldy + n, ldy, K);
    if (M - m == 2) block<2, 1>(x + m * ldx, ldx, wb, ldw, y + m * ldy + n, ldy, K);
    if (M - m == 1) block<1, 1>(x + m * ldx, ldx, wb, ldw, y + m * ldy + n, ldy, K);
  }
}

}  // namespace moe_cpu
