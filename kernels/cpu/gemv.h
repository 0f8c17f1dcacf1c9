// The small-M GEMM core shared by the native CPU ops: y[M, N] = x[M, K] @ W[N, K]^T with 16-bit W,
// fp32 x and fp32 accumulation, on raw pointers (no tensors, no checks: callers check).
//
// Why: on CPUs without native bf16 GEMMs (AVX2, no AVX512-BF16/AMX) torch multiplies a bf16 weight by a
// few rows at about one GEMV per row. Here each 16-bit weight element is loaded once per block of up to
// three activation rows, widened to fp32 in registers (bf16: a mask or a 16-bit shift, x permuted to
// match; fp16: F16C `vcvtph2ps`) and accumulated with FMA in fp32. A block of weight rows stays in L1
// while every M-block of x passes over it, so the weights stream from memory once for all M rows.
//
// Layout: x rows have unit stride along K (any row stride); W is [N, K] with unit stride along K (expert
// slices w13[s], w2[s] of the stacked tensors qualify). Threads split N (at::parallel_for, OpenMP).
// The AVX2 functions carry `target` attributes, so the translation unit itself needs no -mavx2 and the
// scalar fallback runs anywhere; `cpu_has_avx2()` picks at run time.

#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace moe_cpu {


// ----------------------------------------------------------------------------------------------------
// Scalar fallback (any x86 or other CPU): same contract, fp32 accumulation, plain loops.

template <typename W>
void rows_scalar(const float* x, int64_t ldx, const W* w, int64_t ldw, float* y, int64_t ldy, int64_t M,
                 int64_t n0, int64_t n1, int64_t K) {
  for (int64_t n = n0; n < n1; ++n) {
    const W* wr = w + n * ldw;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * ldx;
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += xr[k] * static_cast<float>(wr[k]);
      y[m * ldy + n] = acc;
    }
  }
}

// ----------------------------------------------------------------------------------------------------
// AVX2 + FMA (+ F16C for fp16 weights).

#define AVX2_FN __attribute__((target("avx2,fma,f16c")))

// Eight 16-bit weights -> eight fp32 lanes.
AVX2_FN inline __m256 load8(const c10::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));  // bf16 = top half of fp32
}

AVX2_FN inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

AVX2_FN inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One register block: MB rows of x times NB rows of W, MB * NB accumulators of 8 lanes each. K % 8 tail
// in scalar code after the horizontal sum.
template <int MB, int NB, typename W>
AVX2_FN inline void block(const float* x, int64_t ldx, const W* w, int64_t ldw, float* y, int64_t ldy,
                          int64_t K) {
  __m256 acc[MB][NB];
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_ps();
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

// One row of x against one weight row: a single sequential stream, four accumulators for FMA latency.
template <typename W>
AVX2_FN inline float row_dot(const float* x, const W* w, int64_t K) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k + 512), _MM_HINT_T0);  // 1 KiB ahead
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load8(w + k), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), load8(w + k + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), load8(w + k + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), load8(w + k + 24), a3);
  }
  for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load8(w + k), a0);
  float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; k < K; ++k) s += x[k] * static_cast<float>(w[k]);
  return s;
}

// kStreams rows of W against one row of x, row i of each of kStreams equal slices of [n0, n1) at a time:
// that many independent sequential streams, which one core's prefetchers follow in parallel, where
// neighbouring rows would be a single stream. One EPYC core, bf16 [1536, 1024] and [7168, 1024] from
// memory, medians of 8 alternating rounds in one process (/tmp harness, 2026-11-27): one row at a time
// 15.8 / 16.0 GB/s, 2 streams 20.0 / 20.9, 3 streams 21.4 / 23.0, 4 streams 20.3 / 21.5, 8 streams
// 16.4 / 16.7; a plain AVX2 read loop over the same bytes 17.5-18.1 GB/s (one stream). Rows left over
// after the slices go one at a time.
constexpr int kStreams = 3;

template <typename W>
AVX2_FN void rows_dot_streams(const float* x, const W* w, int64_t ldw, float* y, int64_t n0, int64_t n1,
                              int64_t K) {
  const int64_t per = (n1 - n0) / kStreams;
  for (int64_t i = 0; i < per; ++i) {
    const W* wr[kStreams];
    __m256 a[kStreams][2];
    for (int s = 0; s < kStreams; ++s) {
      wr[s] = w + (n0 + s * per + i) * ldw;
      a[s][0] = a[s][1] = _mm256_setzero_ps();
    }
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
      for (int s = 0; s < kStreams; ++s) {
        if ((k & 31) == 0) _mm_prefetch(reinterpret_cast<const char*>(wr[s] + k + 512), _MM_HINT_T0);  // 1 KiB
        a[s][0] = _mm256_fmadd_ps(x0, load8(wr[s] + k), a[s][0]);
        a[s][1] = _mm256_fmadd_ps(x1, load8(wr[s] + k + 8), a[s][1]);
      }
    }
    for (int s = 0; s < kStreams; ++s) {
      __m256 acc = _mm256_add_ps(a[s][0], a[s][1]);
      int64_t kk = k;
      if (kk + 8 <= K) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + kk), load8(wr[s] + kk), acc), kk += 8;
      float sum = hsum(acc);
      for (; kk < K; ++kk) sum += x[kk] * static_cast<float>(wr[s][kk]);
      y[n0 + s * per + i] = sum;
    }
  }
  for (int64_t n = n0 + kStreams * per; n < n1; ++n) y[n] = row_dot(x, w + n * ldw, K);
}

// One row of x (GEMV): `kStreams` streams at every K. Rows longer than 2048 elements used to go 8
// neighbours at a time (`block<1, 8>`); three slices beat that too (one core, cold weights, median of 7
// rounds, one build after the other on a quiet machine): [1024, 3584]
// 16.8 -> 21.8 GB/s, Mixtral's [4096, 14336] 14.8 -> 25.7 GB/s.
template <typename W>
AVX2_FN void gemv_avx2(const float* x, const W* w, int64_t ldw, float* y, int64_t n0, int64_t n1, int64_t K) {
  rows_dot_streams(x, w, ldw, y, n0, n1, K);
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

template <>
struct Widen<c10::Half> {
  static constexpr bool kEvenOdd = false;
  template <bool kFirst>
  AVX2_FN static inline __m256 lo(const c10::Half* p) { return load8(p); }
  AVX2_FN static inline __m256 hi(const c10::Half* p) { return load8(p + 8); }
};

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
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_ps();
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

inline bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}

// Weight rows per parallel task: a multiple of the register blocks (8 and 4 rows for `block`; 3 and 5
// for `tile`), and small: two threads split N at a task boundary (30-row tasks made w2 [1024, 3584]
// 5-10% slower on two threads: 540 vs 484 rows).
constexpr int64_t kRowsPerTask = 16;
constexpr int64_t kRowsPerTaskTiles = 15;

// y[m * ldy + n] = sum_k x[m * ldx + k] * w[n * ldw + k] for m < M, n < N; threads split N.
template <typename W>
void gemm(const float* x, int64_t ldx, const W* w, int64_t ldw, float* y, int64_t ldy, int64_t M, int64_t N,
          int64_t K, bool simd) {
  if (M <= 0 || N <= 0) return;
  const bool tiles = simd && uses_tiles(M, K);
  const int64_t rows = tiles ? kRowsPerTaskTiles : kRowsPerTask;
  const int64_t tasks = (N + rows - 1) / rows;
  // Below ~64k weight elements per thread, a parallel region costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (std::max<int64_t>(K, 1) * rows));
  std::vector<float> xp;  // x rows in the tiles' k order (bf16: permute_x), [M, K]
  if (tiles) {
    xp.resize(M * K);
    for (int64_t m = 0; m < M; ++m) {
      if (Widen<W>::kEvenOdd)
        permute_x(x + m * ldx, xp.data() + m * K, K);
      else
        std::copy(x + m * ldx, x + m * ldx + K, xp.data() + m * K);
    }
  }
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    const int64_t n0 = t0 * rows, n1 = std::min(N, t1 * rows);
    if (!simd)
      rows_scalar<W>(x, ldx, w, ldw, y, ldy, M, n0, n1, K);
    else if (M == 1)
      gemv_avx2<W>(x, w, ldw, y, n0, n1, K);
    else if (!tiles)
      rows_blocks<W>(x, ldx, w, ldw, y, ldy, M, n0, n1, K);
    else
      rows_avx2<W>(xp.data(), K, w, ldw, y, ldy, M, n0, n1, K);
  });
}

}  // namespace moe_cpu
