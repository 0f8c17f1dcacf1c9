// The small-M GEMM core shared by the native CPU ops: y[M, N] = x[M, K] @ W[N, K]^T with 16-bit W,
// fp32 x and fp32 accumulation, on raw pointers (no tensors, no checks: callers check).
//
// Why: on CPUs without native bf16 GEMMs (AVX2, no AVX512-BF16/AMX) torch multiplies a bf16 weight by a
// few rows at about one GEMV per row. Here each 16-bit weight element is loaded once per block of up to
// three activation rows, widened to fp32 in registers (bf16: a 16-bit shift; fp16: F16C `vcvtph2ps`) and
// accumulated with FMA in fp32. A block of weight rows stays in L1 while every M-block of x passes over
// it, so the weights stream from memory once for all M rows.
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

// One row of x (GEMV): weight rows of up to this many elements go one at a time (one sequential stream:
// 17 vs 14 GB/s for [7168, 1024] bf16 on one EPYC core); longer rows 8 at a time (8 streams: 21.5 vs
// 17.7 GB/s for [1024, 3584]).
constexpr int64_t kRowDotMaxK = 2048;

// All M rows against weight rows [n0, n1): NB weight rows at a time, M in blocks of three (12
// accumulators + 3 x vectors + 1 weight vector = the 16 ymm registers). One row: 8 weight rows at once.
template <typename W>
AVX2_FN void rows_avx2(const float* x, int64_t ldx, const W* w, int64_t ldw, float* y, int64_t ldy, int64_t M,
                       int64_t n0, int64_t n1, int64_t K) {
  int64_t n = n0;
  if (M == 1 && K <= kRowDotMaxK) {
    for (; n < n1; ++n) y[n] = row_dot(x, w + n * ldw, K);
    return;
  }
  if (M == 1) {
    for (; n + 8 <= n1; n += 8) block<1, 8>(x, ldx, w + n * ldw, ldw, y + n, ldy, K);
  }
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

// Weight rows per parallel task: a multiple of both register blocks (8 and 4).
constexpr int64_t kRowsPerTask = 16;

// y[m * ldy + n] = sum_k x[m * ldx + k] * w[n * ldw + k] for m < M, n < N; threads split N.
template <typename W>
void gemm(const float* x, int64_t ldx, const W* w, int64_t ldw, float* y, int64_t ldy, int64_t M, int64_t N,
          int64_t K, bool simd) {
  const int64_t tasks = (N + kRowsPerTask - 1) / kRowsPerTask;
  // Below ~64k weight elements per thread, a parallel region costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (K * kRowsPerTask));
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    const int64_t n0 = t0 * kRowsPerTask, n1 = std::min(N, t1 * kRowsPerTask);
    if (simd)
      rows_avx2<W>(x, ldx, w, ldw, y, ldy, M, n0, n1, K);
    else
      rows_scalar<W>(x, ldx, w, ldw, y, ldy, M, n0, n1, K);
  });
}

}  // namespace moe_cpu
