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
// This file: the scalar fallback, the GEMV (one row of x) and `gemm`, which picks; two or more rows of x
// go through small_m_tiles.h, or dot_bf16.h on AVX512-BF16 CPUs (bf16 x, bf16 or int8 W); the AVX2 basics
// are in vec.h.

#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "dot_bf16.h"
#include "small_m_tiles.h"
#include "vec.h"

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
// One row of x (GEMV), AVX2.

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
// after the slices go one at a time. Every GEMV takes it at any K: rows longer than 2048 elements used to
// go 8 neighbours at a time (`block<1, 8>`), and three slices beat that too (one core, cold weights,
// median of 7 rounds, one build after the other on a quiet machine): [1024, 3584] 16.8 -> 21.8 GB/s,
// Mixtral's [4096, 14336] 14.8 -> 25.7 GB/s.
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
  if constexpr (DotWeights<W>::kTiles) {
    // Enough rows of bf16 values on AVX512-BF16: `vdpbf16ps` tiles (dot_bf16.h; bf16 or int8 W), from the
    // row count measured for this weight type
    const int64_t dp_rows = DotWeights<W>::min_rows().load(std::memory_order_relaxed);
    if (simd && dp_rows > 0 && M >= dp_rows && K > 0 && cpu_has_avx512_bf16() && all_bf16(x, ldx, M, K)) {
      const int64_t Kp = (K + 31) / 32 * 32;
      const std::vector<uint16_t> xb = to_bf16_rows(x, ldx, M, K, Kp);
      const int64_t tasks = (N + kRowsPerTask - 1) / kRowsPerTask;
      const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (K * kRowsPerTask));
      at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
        rows_bf16dp(xb.data(), Kp, w, ldw, y, ldy, M, t0 * kRowsPerTask, std::min(N, t1 * kRowsPerTask), K);
      });
      return;
    }
  }
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
      rows_dot_streams<W>(x, w, ldw, y, n0, n1, K);  // one row of x (GEMV)
    else if (!tiles)
      rows_blocks<W>(x, ldx, w, ldw, y, ldy, M, n0, n1, K);
    else
      rows_avx2<W>(xp.data(), K, w, ldw, y, ldy, M, n0, n1, K);
  });
}

// y[i, c] *= scale[c] for i < n, c < N: the per-row scales of int8 weights (kernels/quant.py), applied to a
// GEMM's fp32 result (row c of W scales output column c); null: 16-bit weights, a no-op.
inline void scale_columns(float* y, int64_t n, int64_t N, const float* scale) {
  if (scale == nullptr) return;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < N; ++c) y[i * N + c] *= scale[c];
}

}  // namespace moe_cpu
