// Small-M GEMM tiles on AVX512-BF16 (`vdpbf16ps`): y[M, n0:n1] = x[M, K] @ W[n0:n1, K]^T with bf16 x, bf16 or
// int8 W, fp32 accumulation, on raw pointers. `gemm` in gemv.h takes this path when the CPU has AVX512-BF16
// (Zen 4, Sapphire Rapids and later), x has at least the weight type's switch point of rows
// (`dot_bf16_min_rows()` / `dot_int8_min_rows()`; 0, the default: never) and every x value is a bf16 value
// (the 16-bit activations of the model's ops are; fp32 ones are not, and keep the AVX2 tiles: rounding them
// here would add a rounding point the model does not have).
//
// The row counts from which these tiles beat the AVX2 ones are measured on the machine, not assumed
// (kernels/cpu/dispatch.py `plan_dot_bf16` / `plan_dot_int8`, cached with the CPU plan, set by
// engine/parts.py): on a 2-vCPU Zen 4 EPYC, one thread, bf16 tiles tie at 2 rows, lose at 4 on K = 1024
// (0.8x) and win from 8 (1.3-1.8x); int8 tiles, two threads, mini's shapes, lose at 1 row (0.7-0.9x: the
// AVX2 GEMV reads half the bytes and is bound by memory), tie at 2 and win from 4 (1.2-1.9x;
// bench/cpu_linear.py --quantization int8).
//
// Why: from a few rows on, the AVX2 tiles are bound by arithmetic, not memory: each weight is widened to
// fp32 (bf16: an AND or a shift; int8: a sign extension and a conversion) before an 8-lane FMA. `vdpbf16ps`
// multiplies 32 bf16 pairs and adds them into 16 fp32 lanes in one instruction: 4x the multiply-adds per
// instruction. Each pair of products is exact in fp32 and added with round-to-nearest (denormals flushed):
// the same sums as the FMA chain up to summation order (and denormals, far below a bf16 ulp of any output
// here). int8 weights (kernels/quant.py) are widened to bf16 in registers, once per tile for all its x rows
// (`DotWeights<int8_t>`): -128..127 are bf16 values, so their products with bf16 x are the AVX2 path's
// exact products too; the row scale is applied after the sum, as there (`scale_columns`).
//
// Layout: x is copied once per call into bf16 rows of Kp elements (K rounded up to 32, zero padded), so
// every step is a whole 64-byte load; W rows are read with a mask on the K % 32 tail. Tiles of up to 4
// rows of x by 4 rows of W (16 accumulators of 16 lanes), each weight vector used by every x row of the
// tile; threads split N as in `gemm`.

#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <immintrin.h>

#include <cstdint>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

#define BF16DP_FN __attribute__((target("avx512f,avx512bw,avx512bf16")))

namespace moe_cpu {

inline bool cpu_has_avx512_bf16() {
  static const bool ok = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
  return ok;
}

// The 8-bit tiles' 64-weight widening (`BytePairs`) also takes AVX512-VBMI's byte permutes (Zen 4, Ice Lake
// and later; not Cooper Lake, whose AVX512-BF16 tiles keep the 32-weight widening).
#define VBMI_FN __attribute__((target("avx512f,avx512bw,avx512bf16,avx512vbmi")))

inline bool cpu_has_avx512_vbmi() {
  static const bool ok = __builtin_cpu_supports("avx512vbmi");
  return ok;
}

// The fewest rows of x that take these tiles (0: none), for the whole process, one per weight type: set
// from the measured plan.
inline std::atomic<int64_t>& dot_bf16_min_rows() {
  static std::atomic<int64_t> rows{0};
  return rows;
}

inline std::atomic<int64_t>& dot_int8_min_rows() {
  static std::atomic<int64_t> rows{0};
  return rows;
}

inline std::atomic<int64_t>& dot_fp8_min_rows() {
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

// How the tiles read weights: 32 of them, w[k..k+31], as one vector of 32 bf16 values in k order (x's
// order), whole (`load`) or the first n < 32 of them with zeros after (`load_tail`, reading nothing past
// the row), and which switch point is theirs. Weight types without tiles (fp16: its values are not bf16
// values) keep the primary template.
template <typename W>
struct DotWeights {
  static constexpr bool kTiles = false;
};

template <>
struct DotWeights<c10::BFloat16> {
  static constexpr bool kTiles = true;
  static constexpr bool kWidened = false;  // loaded as they are
  static std::atomic<int64_t>& min_rows() { return dot_bf16_min_rows(); }
  BF16DP_FN static inline __m512i load(const c10::BFloat16* p) { return _mm512_loadu_si512(p); }
  BF16DP_FN static inline __m512i load_tail(const c10::BFloat16* p, int64_t n) {
    return _mm512_maskz_loadu_epi16((__mmask32{1} << n) - 1, p);
  }
};

// int8: 32 bytes sign-extended to 32-bit and converted to fp32 (exact), and the high halves of the 32 fp32
// values taken as bf16 (exact: |w| <= 128 needs 8 significant bits, so the low halves are zero) by one
// two-source word permute, in k order as x's rows. The permute replaced `vcvtne2ps2bf16` (the same bits): on
// a Zen 4 EPYC, 2 threads, an int8 [2048, 2048] from L3 read 41.7 -> 45.8 GB/s at 1 row of x, 28.3 -> 31.3
// at 4 (`bench/cpu_kernels_ab.py --hot 2048x2048`: where the tiles are bound by the widening, not memory).
template <>
struct DotWeights<int8_t> {
  static constexpr bool kTiles = true;
  static constexpr bool kWidened = true;  // converted in registers (5 instructions per 32 weights)
  static std::atomic<int64_t>& min_rows() { return dot_int8_min_rows(); }
  BF16DP_FN static inline __m512i widen(__m256i b) {
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));      // w[k..k+15]
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));  // w[k+16..]
    const __m512i odd = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29, 27, 25, 23, 21, 19, 17,
                                          15, 13, 11, 9, 7, 5, 3, 1);
    return _mm512_permutex2var_epi16(_mm512_castps_si512(lo), odd, _mm512_castps_si512(hi));
  }
  BF16DP_FN static inline __m512i load(const int8_t* p) {
    return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  BF16DP_FN static inline __m512i load_tail(const int8_t* p, int64_t n) {  // a 512-bit masked load: AVX512-BW
    return widen(_mm512_castsi512_si256(_mm512_maskz_loadu_epi8((__mmask64{1} << n) - 1, p)));
  }
};

// int8 and fp8, 64 weights at a time, with AVX512-VBMI: the bf16 bits of each byte's magnitude (int8: |w|,
// 0..127; fp8: the low 7 bits e.eee.mmm) looked up byte by byte, the high bytes and the low bytes each from
// a 128-entry table (one `vpermi2b` each over 64 weights, which reads the index's low 7 bits), the sign ORed
// into the high bytes, and the two byte vectors interleaved into 2 x 32 bf16 in k order (two `vpermt2b`):
// 6 instructions per 64 weights (fp8: 5, no `abs`) where `DotWeights` takes 10 (fp8: 16). The same bf16
// values, so the same sums bit for bit; fp8's NaN bytes are NaN here again (the table holds it). Needs
// int8 w != -128 (|-128| is not 7 bits), which kernels/quant.py guarantees: its int8 is symmetric,
// -127..127. Zen 4 EPYC, 2 threads, one [2048, 2048] GEMM from L3 (`bench/cpu_kernels_ab.py --hot
// 2048x2048`, against 94fecd9's 32-weight widening): int8 1.56x at 1 row of x (65 GB/s), 1.31x at 2, 1.17x
// at 4, 1.05x at 16; fp8 in docs/benchmarks.md. From memory the GEMV reads at the host's bandwidth below
// ~65 GB/s.
constexpr int bf16_bits_of_int(int v) {  // 0 <= v < 128: exact in bf16's 8 significant bits
  if (v == 0) return 0;
  int e = 0;  // floor(log2 v)
  while ((v >> (e + 1)) != 0) ++e;
  return (127 + e) << 7 | ((v << (7 - e)) & 0x7F);
}

constexpr int bf16_bits_of_e4m3(int m) {  // m: an e4m3fn byte's low 7 bits (its magnitude)
  const int e = m >> 3, f = m & 7;
  if (m == 0x7F) return 0x7FC0;  // NaN
  if (e > 0) return (e + 120) << 7 | f << 4;
  if (f == 0) return 0;
  const int p = f >= 4 ? 2 : f >= 2 ? 1 : 0;  // subnormal f * 2^-9 = 2^(p - 9) * (f / 2^p)
  return (127 + p - 9) << 7 | ((f << (7 - p)) & 0x7F);
}

struct ByteTables {
  alignas(64) uint8_t hi[128] = {}, lo[128] = {};  // bf16 bits of each magnitude: high, low byte
  alignas(64) uint8_t first[64] = {}, second[64] = {};  // byte interleaves: lo[i], hi[i] for i < 32; i >= 32
  constexpr explicit ByteTables(bool fp8) {
    for (int v = 0; v < 128; ++v) {
      const int bits = fp8 ? bf16_bits_of_e4m3(v) : bf16_bits_of_int(v);
      hi[v] = static_cast<uint8_t>(bits >> 8);
      lo[v] = static_cast<uint8_t>(bits & 0xFF);
    }
    for (int i = 0; i < 32; ++i) {
      first[2 * i] = static_cast<uint8_t>(i);
      first[2 * i + 1] = static_cast<uint8_t>(64 + i);
      second[2 * i] = static_cast<uint8_t>(32 + i);
      second[2 * i + 1] = static_cast<uint8_t>(96 + i);
    }
  }
};
inline constexpr ByteTables kInt8Tables{false};
inline constexpr ByteTables kFp8Tables{true};

template <typename W>
struct BytePairs {
  static_assert(std::is_same_v<W, int8_t> || std::is_same_v<W, c10::Float8_e4m3fn>, "8-bit weights only");
  // w[k..k+31] -> a, w[k+32..k+63] -> b (bf16).
  VBMI_FN static inline void load(const W* p, __m512i& a, __m512i& b) {
    constexpr bool kInt8 = std::is_same_v<W, int8_t>;
    const ByteTables& t = kInt8 ? kInt8Tables : kFp8Tables;
    const __m512i w = _mm512_loadu_si512(p);
    const __m512i mag = kInt8 ? _mm512_abs_epi8(w) : w;  // fp8: the sign bit is outside the 7 index bits
    const __m512i hi = _mm512_ternarylogic_epi32(  // hi | (w & 0x80): the sign bit
        _mm512_permutex2var_epi8(_mm512_load_si512(t.hi), mag, _mm512_load_si512(t.hi + 64)), w,
        _mm512_set1_epi8(static_cast<char>(0x80)), 0xF8);
    const __m512i lo = _mm512_permutex2var_epi8(_mm512_load_si512(t.lo), mag, _mm512_load_si512(t.lo + 64));
    a = _mm512_permutex2var_epi8(lo, _mm512_load_si512(t.first), hi);
    b = _mm512_permutex2var_epi8(lo, _mm512_load_si512(t.second), hi);
  }
};

// How far ahead of its loads each weight stream of the tiles prefetches, in bytes, into L2 (`_MM_HINT_T1`:
// the L1 holds x and the tile's current lines). Each stream is a run of consecutive weight rows, so the
// address ahead is the same stream's next bytes, past a row's end into the next tile's row.
//
// Why: from a few rows of x on, the tiles alternate between waiting for memory and computing, and the
// hardware prefetchers do not run far enough ahead to overlap the two. Scratch harness, Zen 4 EPYC, two
// threads, mini's w13 then w2 from memory, 8 copies cycled, medians of 9 rounds, two runs (GB/s read, the
// old prefetch = the next tile's row into L1, one row ahead): 3 rows 29-30 -> 36, 4 rows 26-27.5 -> 34-36,
// 6 rows 25 -> 35-36, 8 rows 23 -> 30-34, 1-2 rows level; distances of 8-32 KiB and hint T1 or T2 all
// within the noise of each other, 2-4 KiB about half the gain; from L2 (hot) no loss (+10%, the old
// prefetch into L1 cost issue slots). The GEMV (gemv.h `rows_dot_streams`) gained nothing from it: it
// already reads at the bandwidth the host gives.
constexpr int64_t kPrefetchBytes = 16384;

// float8_e4m3fn (FP8 experts): 32 bytes zero-extended to 16-bit lanes s.eeee.mmm and rebuilt as bf16 in
// place, exactly (every finite e4m3 value is a bf16 value): normals (e > 0) (e + 120) << 7 | m << 4, the
// rebiased exponent and the mantissa's top bits, in a shift, an AND and an add; e = 0 (zero and the
// subnormals m * 2^-9) from an 8-entry table indexed by m; the sign bit ORed in at bit 15 (one ternary-logic
// op). 8 instructions per 32 weights (int8's: 5). Finite bytes only: the NaN bytes (0x7F, 0xFF) would come
// out as +-480, and a NaN check here cost all of the gain over the earlier 11-instruction widening (which
// kept NaN); the loader refuses NaN FP8 weights instead (checkpoint/fp8.py `check_no_nan`), and our
// quantizer makes none from finite weights. The AVX2 path (vec.h `load8`) and `BytePairs` keep NaN. Zen 4
// EPYC, 2 threads, an fp8 [2048, 2048] from L3: 33.5 -> 38.9 GB/s at 1 row of x, 24.7 -> 26.1 at 4 (same
// bench). With AVX512-VBMI the tiles take `BytePairs` instead, but for the K % 64 remainder.
template <>
struct DotWeights<c10::Float8_e4m3fn> {
  static constexpr bool kTiles = true;
  static constexpr bool kWidened = true;
  static std::atomic<int64_t>& min_rows() { return dot_fp8_min_rows(); }
  BF16DP_FN static inline __m512i widen(__m256i bytes) {
    const __m512i b = _mm512_cvtepu8_epi16(bytes);  // 32 x 16 bits, k order
    __m512i v = _mm512_add_epi16(_mm512_and_si512(_mm512_slli_epi16(b, 4), _mm512_set1_epi16(0x07F0)),
                                 _mm512_set1_epi16(120 << 7));  // |w| of the normals
    const __m512i subnormals = _mm512_zextsi128_si512(  // bf16 of m * 2^-9 in words m = 0..7
        _mm_setr_epi16(0x0000, 0x3B00, 0x3B80, 0x3BC0, 0x3C00, 0x3C20, 0x3C40, 0x3C60));
    // e = 0: the index's low 5 bits are then m
    v = _mm512_mask_permutexvar_epi16(v, _mm512_testn_epi16_mask(b, _mm512_set1_epi16(0x78)), b, subnormals);
    // v | (b << 8 & 0x8000): the sign bit
    return _mm512_ternarylogic_epi32(v, _mm512_slli_epi16(b, 8), _mm512_set1_epi16(int16_t(0x8000)), 0xF8);
  }
  BF16DP_FN static inline __m512i load(const c10::Float8_e4m3fn* p) {
    return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  BF16DP_FN static inline __m512i load_tail(const c10::Float8_e4m3fn* p, int64_t n) {
    return widen(_mm512_castsi512_si256(_mm512_maskz_loadu_epi8((__mmask64{1} << n) - 1, p)));
  }
};

// One tile: MB rows of x (bf16, row stride Kp) times NB rows of W (`wsj` elements apart); output column j
// of row i goes to y[i * ldy + j * ycs]. `pf`: how far ahead of the loads each weight row prefetches, in
// elements (0: not at all, for weights already in L1), one cache line per step (every step for bf16's 64
// bytes, every other one for int8's 32). `dot_steps` adds k0..K into the accumulators, 32 at a time, then
// the K % 32 tail; `dot_tile_pairs` takes 8-bit weights' first 64-multiple with `BytePairs`, then the same steps.
template <int MB, int NB, typename W>
BF16DP_FN inline void dot_steps(__m512 (&acc)[MB][NB], const uint16_t* x, int64_t Kp, const W* w, int64_t wsj,
                                int64_t k0, int64_t K, int64_t pf) {
  const int64_t whole = K / 32 * 32;
  for (int64_t k = k0; k < whole; k += 32) {
    __m512i xv[MB];
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) xv[i] = _mm512_loadu_si512(x + i * Kp + k);
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      if (pf > 0 && (sizeof(W) == 2 || (k & 63) == 0))
        _mm_prefetch(reinterpret_cast<const char*>(w + j * wsj + pf + k), _MM_HINT_T1);
      const __m512i wv = DotWeights<W>::load(w + j * wsj + k);
#pragma GCC unroll 4
      for (int i = 0; i < MB; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv[i], (__m512bh)wv);
    }
  }
  if (whole < K) {  // the K % 32 tail: W masked (never read past its row), x already zero padded
    __m512i xv[MB];
    for (int i = 0; i < MB; ++i) xv[i] = _mm512_loadu_si512(x + i * Kp + whole);
    for (int j = 0; j < NB; ++j) {
      const __m512i wv = DotWeights<W>::load_tail(w + j * wsj + whole, K - whole);
      for (int i = 0; i < MB; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv[i], (__m512bh)wv);
    }
  }
}

template <int MB, int NB>
BF16DP_FN inline void dot_zero(__m512 (&acc)[MB][NB]) {
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
}

template <int MB, int NB>
BF16DP_FN inline void dot_store(__m512 (&acc)[MB][NB], float* y, int64_t ldy, int64_t ycs) {
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) y[i * ldy + j * ycs] = _mm512_reduce_add_ps(acc[i][j]);
}

template <int MB, int NB, typename W>
BF16DP_FN inline void dot_tile(const uint16_t* x, int64_t Kp, const W* w, int64_t wsj, float* y, int64_t ldy,
                               int64_t ycs, int64_t K, int64_t pf) {
  __m512 acc[MB][NB];
  dot_zero<MB, NB>(acc);
  dot_steps<MB, NB>(acc, x, Kp, w, wsj, 0, K, pf);
  dot_store<MB, NB>(acc, y, ldy, ycs);
}

template <int MB, int NB, typename W>
VBMI_FN void dot_tile_pairs(const uint16_t* x, int64_t Kp, const W* w, int64_t wsj, float* y, int64_t ldy,
                            int64_t ycs, int64_t K, int64_t pf) {
  __m512 acc[MB][NB];
  dot_zero<MB, NB>(acc);
  const int64_t pairs = K / 64 * 64;
  for (int64_t k = 0; k < pairs; k += 64) {
    __m512i x0[MB], x1[MB];
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) {
      x0[i] = _mm512_loadu_si512(x + i * Kp + k);
      x1[i] = _mm512_loadu_si512(x + i * Kp + k + 32);
    }
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      if (pf > 0) _mm_prefetch(reinterpret_cast<const char*>(w + j * wsj + pf + k), _MM_HINT_T1);
      __m512i a, b;
      BytePairs<W>::load(w + j * wsj + k, a, b);
#pragma GCC unroll 4
      for (int i = 0; i < MB; ++i) {  // k..k+31, then k+32..k+63: the 32-step order, the same sums
        acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)x0[i], (__m512bh)a);
        acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)x1[i], (__m512bh)b);
      }
    }
  }
  dot_steps<MB, NB>(acc, x, Kp, w, wsj, pairs, K, pf);
  dot_store<MB, NB>(acc, y, ldy, ycs);
}

// One tile of MB x rows: `dot_tile`, or `dot_tile_pairs` (8-bit weights, AVX512-VBMI).
template <int MB, int NB, bool Pairs, typename W>
BF16DP_FN inline void tile(const uint16_t* x, int64_t Kp, const W* w, int64_t wsj, float* y, int64_t ldy,
                           int64_t ycs, int64_t K, int64_t pf) {
  if constexpr (Pairs)
    dot_tile_pairs<MB, NB>(x, Kp, w, wsj, y, ldy, ycs, K, pf);
  else
    dot_tile<MB, NB>(x, Kp, w, wsj, y, ldy, ycs, K, pf);
}

// NB weight rows against every x row, in tiles of 4 x rows (then 3, 2 or 1).
template <int NB, bool Pairs, typename W>
BF16DP_FN inline void dot_rows(const uint16_t* x, int64_t Kp, const W* w, int64_t wsj, float* y, int64_t ldy,
                               int64_t ycs, int64_t M, int64_t K, int64_t pf) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile<4, NB, Pairs>(x + m * Kp, Kp, w, wsj, y + m * ldy, ldy, ycs, K, pf);
  switch (M - m) {
    case 3: tile<3, NB, Pairs>(x + m * Kp, Kp, w, wsj, y + m * ldy, ldy, ycs, K, pf); break;
    case 2: tile<2, NB, Pairs>(x + m * Kp, Kp, w, wsj, y + m * ldy, ldy, ycs, K, pf); break;
    case 1: tile<1, NB, Pairs>(x + m * Kp, Kp, w, wsj, y + m * ldy, ldy, ycs, K, pf); break;
    default: break;
  }
}

// NB rows of W (`wsj` elements apart) as bf16 rows of Kp elements at out + j * Kp, zero padded, read along k
// together as the tiles read them (NB streams, `pf` as in `dot_tile`), from k0 on.
template <int NB, typename W>
BF16DP_FN inline void widen_rows(const W* w, int64_t wsj, uint16_t* out, int64_t Kp, int64_t K, int64_t pf,
                                 int64_t k0 = 0) {
  const int64_t whole = K / 32 * 32;
  for (int64_t k = k0; k < whole; k += 32) {
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      if (sizeof(W) == 2 || (k & 63) == 0)
        _mm_prefetch(reinterpret_cast<const char*>(w + j * wsj + pf + k), _MM_HINT_T1);
      _mm512_storeu_si512(out + j * Kp + k, DotWeights<W>::load(w + j * wsj + k));
    }
  }
  if (whole < K)
    for (int j = 0; j < NB; ++j)
      _mm512_storeu_si512(out + j * Kp + whole, DotWeights<W>::load_tail(w + j * wsj + whole, K - whole));
}

// The same for 8-bit rows with `BytePairs` (AVX512-VBMI), 64 at a time, then `widen_rows` for the rest.
template <int NB, typename W>
VBMI_FN void widen_rows_pairs(const W* w, int64_t wsj, uint16_t* out, int64_t Kp, int64_t K, int64_t pf) {
  const int64_t pairs = K / 64 * 64;
  for (int64_t k = 0; k < pairs; k += 64) {
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(w + j * wsj + pf + k), _MM_HINT_T1);
      __m512i a, b;
      BytePairs<W>::load(w + j * wsj + k, a, b);
      _mm512_storeu_si512(out + j * Kp + k, a);
      _mm512_storeu_si512(out + j * Kp + k + 32, b);
    }
  }
  widen_rows<NB>(w, wsj, out, Kp, K, pf, pairs);
}

template <int NB, bool Pairs, typename W>
BF16DP_FN inline void widen(const W* w, int64_t wsj, uint16_t* out, int64_t Kp, int64_t K, int64_t pf) {
  if constexpr (Pairs)
    widen_rows_pairs<NB>(w, wsj, out, Kp, K, pf);
  else
    widen_rows<NB>(w, wsj, out, Kp, K, pf);
}

// y[m * ldy + n] for m < M, n0 <= n < n1 (W: bf16 or int8, `DotWeights`). A tile takes row i of each of 4
// equal slices of [n0, n1), so the weights stream from 4 places at once (one core's prefetchers follow
// several sequential streams in parallel; neighbouring rows are one stream), as the AVX2 tiles do
// (`m_blocks_streams`); rows left over go one at a time.
//
// Weights the tiles widen (int8) and more than one tile of x rows (M > 4): each tile would widen every weight
// vector again, and the widening, not the `vdpbf16ps`, bounds the time. So each group of weight rows is
// widened once into a bf16 scratch of 4 * Kp elements (L1/L2) and the bf16 tiles run over it: the same bf16
// values in the same order, so the same sums bit for bit (Zen 4 EPYC, two threads, mini's w13 at 32 rows:
// 2.34 ms widened per tile, 1.75 ms widened once; the bf16 tiles 1.6 ms).
template <bool Pairs, typename W>
BF16DP_FN inline void rows_tiles(const uint16_t* x, int64_t Kp, const W* w, int64_t ldw, float* y, int64_t ldy,
                                 int64_t M, int64_t n0, int64_t n1, int64_t K) {
  const int64_t per = (n1 - n0) / 4;
  const int64_t pf = kPrefetchBytes / static_cast<int64_t>(sizeof(W));
  if constexpr (DotWeights<W>::kWidened) {
    if (M > 4) {
      std::vector<uint16_t> wb(4 * Kp);
      const auto* b = reinterpret_cast<const c10::BFloat16*>(wb.data());
      for (int64_t i = 0; i < per; ++i) {
        widen<4, Pairs>(w + (n0 + i) * ldw, per * ldw, wb.data(), Kp, K, pf);
        dot_rows<4, false>(x, Kp, b, Kp, y + n0 + i, ldy, per, M, K, 0);
      }
      for (int64_t n = n0 + 4 * per; n < n1; ++n) {
        widen<1, Pairs>(w + n * ldw, ldw, wb.data(), Kp, K, pf);
        dot_rows<1, false>(x, Kp, b, Kp, y + n, ldy, 1, M, K, 0);
      }
      return;
    }
  }
  for (int64_t i = 0; i < per; ++i)
    dot_rows<4, Pairs>(x, Kp, w + (n0 + i) * ldw, per * ldw, y + n0 + i, ldy, per, M, K, pf);
  for (int64_t n = n0 + 4 * per; n < n1; ++n)
    dot_rows<1, Pairs>(x, Kp, w + n * ldw, ldw, y + n, ldy, 1, M, K, pf);
}

template <typename W>
BF16DP_FN inline void rows_bf16dp(const uint16_t* x, int64_t Kp, const W* w, int64_t ldw, float* y, int64_t ldy,
                                  int64_t M, int64_t n0, int64_t n1, int64_t K) {
  static_assert(DotWeights<W>::kTiles, "vdpbf16ps tiles take bf16, int8 or fp8 weights");
  if constexpr (sizeof(W) == 1) {
    if (cpu_has_avx512_vbmi()) return rows_tiles<true>(x, Kp, w, ldw, y, ldy, M, n0, n1, K);
  }
  rows_tiles<false>(x, Kp, w, ldw, y, ldy, M, n0, n1, K);
}

}  // namespace moe_cpu
