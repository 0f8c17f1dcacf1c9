// Small-M GEMM tiles on AVX512-BF16 (`vdpbf16ps`): y[M, n0:n1] = x[M, K] @ W[n0:n1, K]^T with bf16 x and W,
// fp32 accumulation, on raw pointers. `gemm` in gemv.h takes this path when the CPU has AVX512-BF16 (Zen 4,
// Sapphire Rapids and later), x has at least `dot_bf16_min_rows()` rows (0, the default: never) and every
// x value is a bf16 value (the 16-bit activations of the model's ops are; fp32 ones are not, and keep the
// AVX2 tiles: rounding them here would add a rounding point the model does not have).
//
// The row count from which these tiles beat the AVX2 ones is measured on the machine, not assumed
// (kernels/cpu/dispatch.py `plan_dot_bf16`, cached with the CPU plan, set by engine/parts.py): on a 2-vCPU
// Zen 4 EPYC, one thread, they tie at 2 rows, lose at 4 on K = 1024 (0.8x) and win from 8 (1.3-1.8x).
//
// Why: from a few rows on, the AVX2 tiles are bound by arithmetic, not memory: each bf16 weight is widened
// to fp32 (an AND or a shift) before an 8-lane FMA. `vdpbf16ps` multiplies 32 bf16 pairs and adds them
// into 16 fp32 lanes in one instruction, with no widening: 4x the multiply-adds per instruction. Each
// pair of products is exact in fp32 and added with round-to-nearest (denormals flushed): the same sums as
// the FMA chain up to summation order (and denormals, far below a bf16 ulp of any output here).
//
// Layout: x is copied once per call into bf16 rows of Kp elements (K rounded up to 32, zero padded), so
// every step is a whole 64-byte load; W rows are read with a mask on the K % 32 tail. Tiles of up to 4
// rows of x by 4 rows of W (16 accumulators of 16 lanes), each weight vector used by every x row of the
// tile; threads split N as in `gemm`.

#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstdint>
#include <atomic>
#include <cstring>
#include <vector>

#define BF16DP_FN __attribute__((target("avx512f,avx512bw,avx512bf16")))

namespace moe_cpu {

inline bool cpu_has_avx512_bf16() {
  static const bool ok = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
  return ok;
}

// The fewest rows of x that take these tiles (0: none), for the whole process: set from the measured plan.
inline std::atomic<int64_t>& dot_bf16_min_rows() {
  static std::atomic<int64_t> rows{0};
  return rows;
}

// Whether every x[m, k] (m < M, k < K) is exactly a bf16 value (its low 16 bits are zero).
inline bool all_bf16(const float* x, int64_t ldx, int64_t M, int64_t K) {
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * ldx;
    uint32_t low = 0;
    for (int64_t k = 0; k < K; ++k) {
      uint32_t bits;
      std::memcpy(&bits, row + k, 4);
      low |= bits & 0xFFFFu;
    }
    if (low != 0) return false;
  }
  return true;
}

// x [M, K] fp32 holding bf16 values -> [M, Kp] bf16 bits, zero padded to Kp (a multiple of 32).
inline std::vector<uint16_t> to_bf16_rows(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp) {
  std::vector<uint16_t> out(M * Kp, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      uint32_t bits;
      std::memcpy(&bits, x + m * ldx + k, 4);
      out[m * Kp + k] = static_cast<uint16_t>(bits >> 16);
    }
  return out;
}

// One tile: MB rows of x (bf16, row stride Kp) times NB rows of W (`wsj` elements apart); output column j
// of row i goes to y[i * ldy + j * ycs]. `pf`: where the next tile's rows start relative to these
// (prefetched one cache line per row ahead of the loads).
template <int MB, int NB>
BF16DP_FN inline void dot_tile(const uint16_t* x, int64_t Kp, const c10::BFloat16* w, int64_t wsj, float* y,
                               int64_t ldy, int64_t ycs, int64_t K, int64_t pf) {
  __m512 acc[MB][NB];
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t whole = K / 32 * 32;
  for (int64_t k = 0; k < whole; k += 32) {
    __m512i xv[MB];
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) xv[i] = _mm512_loadu_si512(x + i * Kp + k);
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(w + j * wsj + pf + k), _MM_HINT_T0);
      const __m512i wv = _mm512_loadu_si512(w + j * wsj + k);
#pragma GCC unroll 4
      for (int i = 0; i < MB; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv[i], (__m512bh)wv);
    }
  }
  if (whole < K) {  // the K % 32 tail: W masked (never read past its row), x already zero padded
    const __mmask32 mask = (__mmask32{1} << (K - whole)) - 1;
    __m512i xv[MB];
    for (int i = 0; i < MB; ++i) xv[i] = _mm512_loadu_si512(x + i * Kp + whole);
    for (int j = 0; j < NB; ++j) {
      const __m512i wv = _mm512_maskz_loadu_epi16(mask, w + j * wsj + whole);
      for (int i = 0; i < MB; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv[i], (__m512bh)wv);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) y[i * ldy + j * ycs] = _mm512_reduce_add_ps(acc[i][j]);
}

// NB weight rows against every x row, in tiles of 4 x rows (then 3, 2 or 1).
template <int NB>
BF16DP_FN inline void dot_rows(const uint16_t* x, int64_t Kp, const c10::BFloat16* w, int64_t wsj, float* y,
                               int64_t ldy, int64_t ycs, int64_t M, int64_t K, int64_t pf) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) dot_tile<4, NB>(x + m * Kp, Kp, w, wsj, y + m * ldy, ldy, ycs, K, pf);
  switch (M - m) {
    case 3: dot_tile<3, NB>(x + m * Kp, Kp, w, wsj, y + m * ldy, ldy, ycs, K, pf); break;
    case 2: dot_tile<2, NB>(x + m * Kp, Kp, w, wsj, y + m * ldy, ldy, ycs, K, pf); break;
    case 1: dot_tile<1, NB>(x + m * Kp, Kp, w, wsj, y + m * ldy, ldy, ycs, K, pf); break;
    default: break;
  }
}

// y[m * ldy + n] for m < M, n0 <= n < n1. A tile takes row i of each of 4 equal slices of [n0, n1), so the
// weights stream from 4 places at once (one core's prefetchers follow several sequential streams in
// parallel; neighbouring rows are one stream), as the AVX2 tiles do (`m_blocks_streams`); rows left over
// go one at a time.
BF16DP_FN inline void rows_bf16dp(const uint16_t* x, int64_t Kp, const c10::BFloat16* w, int64_t ldw, float* y,
                                  int64_t ldy, int64_t M, int64_t n0, int64_t n1, int64_t K) {
  const int64_t per = (n1 - n0) / 4;
  for (int64_t i = 0; i < per; ++i)
    dot_rows<4>(x, Kp, w + (n0 + i) * ldw, per * ldw, y + n0 + i, ldy, per, M, K, ldw);
  for (int64_t n = n0 + 4 * per; n < n1; ++n) dot_rows<1>(x, Kp, w + n * ldw, ldw, y + n, ldy, 1, M, K, ldw);
}

}  // namespace moe_cpu
