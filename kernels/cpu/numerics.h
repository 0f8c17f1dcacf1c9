// Rounding to the activation dtype and the SiLU of the native CPU ops, eight lanes at a time.
//
// The ops compute in fp32 and round where torch rounds: after each GEMM, after SiLU, after the gate * up
// product, after each RoPE multiply and add. `Act` is the activation dtype (float, c10::BFloat16 or
// c10::Half) and `round_to<Act>(v)` gives v rounded to it (round to nearest even), back in fp32; for
// float it is the identity. `round8` gives the same bits as `round_to` (NaN payloads aside); `exp8` is
// Cephes' method, a few fp32 ulp from std::exp, and its result is rounded to Act afterwards.

#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "vec.h"  // AVX2_FN, load8, hsum

namespace moe_cpu {

template <typename Act>
inline float round_to(float v) {
  if constexpr (std::is_same_v<Act, float>)
    return v;
  else
    return static_cast<float>(Act(v));
}

template <typename Act>
AVX2_FN inline __m256 round8(__m256 v) {
  if constexpr (std::is_same_v<Act, float>) {
    return v;
  } else if constexpr (std::is_same_v<Act, c10::Half>) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  } else {  // bf16: add 0x7fff + the lowest kept bit, drop the low half (NaNs keep a NaN pattern)
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i up = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
    const __m256i r = _mm256_and_si256(up, _mm256_set1_epi32(static_cast<int>(0xffff0000u)));
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    return _mm256_blendv_ps(_mm256_castsi256_ps(r), v, nan);
  }
}

// v[0:n] rounded to Act in place (eight lanes at a time with AVX2).
template <typename Act>
AVX2_FN inline void round_all_avx2(float* v, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(v + i, round8<Act>(_mm256_loadu_ps(v + i)));
  for (; i < n; ++i) v[i] = round_to<Act>(v[i]);
}

template <typename Act>
inline void round_all(float* v, int64_t n, bool simd) {
  if constexpr (std::is_same_v<Act, float>) return;
  if (simd) return round_all_avx2<Act>(v, n);
  for (int64_t i = 0; i < n; ++i) v[i] = round_to<Act>(v[i]);
}

// Eight fp32 lanes that already hold values of Act -> eight Act elements at p (exact).
AVX2_FN inline void store8(c10::BFloat16* p, __m256 v) {
  const __m256i b = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
}

AVX2_FN inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

// exp(x) for fp32 lanes: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial for exp(r) (Cephes'
// coefficients), 2^n through the exponent bits. Inputs are clamped to [-87.3, 88.3] (no denormals, no inf).
AVX2_FN inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts: exact n * hi
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// act[c] = round(round(silu(round(gate[c]))) * round(up[c])) for c < n: the torch backend's
// silu_(gate).mul_(up) on GEMM results rounded to Act (SiLU: x / (1 + exp(-x)) in fp32).
template <typename Act>
inline void silu_mul_scalar(const float* gate, const float* up, float* act, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    const float g = round_to<Act>(gate[c]);
    const float s = round_to<Act>(g / (1.f + std::exp(-g)));
    act[c] = round_to<Act>(s * round_to<Act>(up[c]));
  }
}

template <typename Act>
AVX2_FN inline void silu_mul_avx2(const float* gate, const float* up, float* act, int64_t n) {
  int64_t c = 0;
  const __m256 one = _mm256_set1_ps(1.f);
  for (; c + 8 <= n; c += 8) {
    const __m256 g = round8<Act>(_mm256_loadu_ps(gate + c));
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    const __m256 s = round8<Act>(_mm256_div_ps(g, _mm256_add_ps(one, e)));
    _mm256_storeu_ps(act + c, round8<Act>(_mm256_mul_ps(s, round8<Act>(_mm256_loadu_ps(up + c)))));
  }
  silu_mul_scalar<Act>(gate + c, up + c, act + c, n - c);
}

}  // namespace moe_cpu
