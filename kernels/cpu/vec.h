// AVX2 basics of the native CPU ops: the target attribute, 16-bit loads widened to fp32, a horizontal
// sum, and the run-time check. The AVX2 functions carry `target` attributes, so no translation unit needs
// -mavx2 and the scalar fallbacks run anywhere; `cpu_has_avx2()` picks at run time.

#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>

namespace moe_cpu {

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

// Eight int8 weights -> eight fp32 lanes (the quantized values; the caller applies the row's scale after the
// K sum, kernels/quant.py).
AVX2_FN inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// Eight float8_e4m3fn weights (FP8 experts, kernels/quant.py) -> eight fp32 lanes, exactly: each byte
// s.eeee.mmm is moved into fp16 bits s.0eeee.mmm0000000 (exponent bias 15 instead of 7), converted by F16C
// (which reads fp16 subnormals exactly whatever MXCSR's DAZ says, so the e4m3 subnormals m * 2^-9 come out
// right) and multiplied by 2^8 (exact); 0x7F / 0xFF, e4m3fn's NaNs, become NaN. torch's conversion of the
// same bytes gives the same bits (tests/kernels/test_cpu_fp8.py, all 256 bytes).
AVX2_FN inline __m256 load8(const c10::Float8_e4m3fn* p) {
  const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));  // 8 x 16 bits
  const __m128i em = _mm_and_si128(_mm_slli_epi16(b, 7), _mm_set1_epi16(0x3F80));
  const __m128i sign = _mm_and_si128(_mm_slli_epi16(b, 8), _mm_set1_epi16(int16_t(0x8000)));
  const __m256 v = _mm256_mul_ps(_mm256_cvtph_ps(_mm_or_si128(em, sign)), _mm256_set1_ps(256.0f));
  const __m128i nan16 = _mm_cmpeq_epi16(em, _mm_set1_epi16(0x3F80));  // exponent and mantissa all ones
  return _mm256_or_ps(v, _mm256_castsi256_ps(_mm256_cvtepi16_epi32(nan16)));  // all-ones lanes: NaN
}

AVX2_FN inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}

}  // namespace moe_cpu
