// Quantize a 16-bit or fp32 weight per row to int8 or float8_e4m3fn with fp32 row scales, and dequantize int8
// weights back in one pass.
//
// Quantize: scale[r] = amax_k |w[r, k]| / qmax (1 for an all-zero row), data[r, k] = w[r, k] / scale[r]
// rounded to nearest-even and clamped to +-qmax (int8: 127), or clamped to +-448 and converted with c10's
// e4m3 rounding (fp8): kernels/quant.py `quantize_into`'s torch ops, the same bits (the same IEEE fp32
// division and rounding; tests/kernels/test_quant.py compares them). Why: torch's ops take six passes and
// an fp32 temporary (22 ms for mini's w13 on 2 Zen 4 threads): quantizing at load, and an offload tier's
// every read of a 16-bit expert (offload/host_tier.py `MmapTier`), paid that per expert.
//
// Dequantize int8 or float8_e4m3fn weights with per-row scales to a 16-bit or fp32 weight in one pass:
// out[r, k] = round(data[r, k] * scale[r]) in out's dtype (kernels/quant.py `QuantizedWeight.dequantize`,
// the same bits: an 8-bit value, exact in fp32, times an fp32 scale is one fp32 product, rounded once).
// torch converts float8_e4m3fn to other dtypes one element at a time on the CPU (mini's FP8 experts decoded
// at 1.4 tok/s against bf16's 95, all of it in that conversion); here 8 at a time (vec.h `load8`).
//
// Why: expert groups of many rows (prefill) run torch's GEMMs on the dequantized expert where those win
// (oneDNN's AVX512-BF16 / AMX bf16 GEMMs; kernels/cpu/moe.py's `bf16` choice). Dequantizing with torch ops
// takes three passes and an fp32 temporary of the whole expert (mini's w13: 29 MB); this reads the int8
// values once and writes the result once, rows split over threads.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <c10/util/Float8_e4m3fn.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "numerics.h"
#include "vec.h"

namespace moe_cpu {
namespace {

template <typename Q, typename Out>
AVX2_FN void dequantize_rows_avx2(const Q* q, const float* scale, Out* out, int64_t r0, int64_t r1, int64_t K) {
  for (int64_t r = r0; r < r1; ++r) {
    const Q* qr = q + r * K;
    Out* o = out + r * K;
    const __m256 s = _mm256_set1_ps(scale[r]);
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256 v = _mm256_mul_ps(load8(qr + k), s);
      if constexpr (std::is_same_v<Out, float>)
        _mm256_storeu_ps(o + k, v);
      else
        store8(o + k, round8<Out>(v));
    }
    for (; k < K; ++k) o[k] = Out(static_cast<float>(qr[k]) * scale[r]);
  }
}

template <typename Q, typename Out>
void dequantize_rows_scalar(const Q* q, const float* scale, Out* out, int64_t r0, int64_t r1, int64_t K) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t k = 0; k < K; ++k) out[r * K + k] = Out(static_cast<float>(q[r * K + k]) * scale[r]);
}

inline float load1(const float* p) { return *p; }
template <typename In>
inline float load1(const In* p) { return static_cast<float>(*p); }

// Rows [r0, r1) of w [rows, K] into q and scale; `row` is a K-float scratch row.
template <typename In, typename Q>
AVX2_FN void quantize_rows(const In* w, Q* q, float* scale, int64_t r0, int64_t r1, int64_t K, float qmax,
                           bool simd, float* row) {
  for (int64_t r = r0; r < r1; ++r) {
    const In* wr = w + r * K;
    int64_t k = 0;
    __m256 m8 = _mm256_setzero_ps();
    if constexpr (!std::is_same_v<In, float>) {
      if (simd)
        for (; k + 8 <= K; k += 8) {
          const __m256 v = load8(wr + k);
          _mm256_storeu_ps(row + k, v);
          m8 = _mm256_max_ps(m8, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v));
        }
    }
    float amax = 0.0f;
    if (k > 0) {
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, m8);
      for (float v : lanes) amax = std::max(amax, v);
    }
    for (; k < K; ++k) {
      row[k] = load1(wr + k);
      amax = std::max(amax, std::fabs(row[k]));
    }
    const float s = amax > 0.0f ? amax / qmax : 1.0f;
    scale[r] = s;
    Q* qr = q + r * K;
    for (k = 0; k < K; ++k) {
      const float v = std::min(std::max(row[k] / s, -qmax), qmax);
      if constexpr (std::is_same_v<Q, int8_t>)
        qr[k] = static_cast<int8_t>(std::nearbyint(v));  // the default rounding mode: to nearest, ties even
      else
        qr[k] = Q(v);
    }
  }
}

}  // namespace

// See kernels/cpu/__init__.py `quantize_into`.
void quantize_into(const at::Tensor& w, at::Tensor& data, at::Tensor& scale, bool simd) {
  TORCH_CHECK(w.is_contiguous() && w.dim() >= 1 && w.device().is_cpu(),
              "quantize: w must be a contiguous CPU tensor [..., N, K], got ", w.sizes(), " ", w.device());
  const auto wt = w.scalar_type();
  TORCH_CHECK(wt == at::kBFloat16 || wt == at::kHalf || wt == at::kFloat,
              "quantize: w must be bfloat16, float16 or float32, got ", wt);
  const auto qt = data.scalar_type();
  TORCH_CHECK((qt == at::kChar || qt == at::kFloat8_e4m3fn) && data.is_contiguous() && data.sizes() == w.sizes(),
              "quantize: data must be contiguous int8 or float8_e4m3fn ", w.sizes(), ", got ", qt, " ",
              data.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  scale.sizes() == w.sizes().slice(0, w.dim() - 1),
              "quantize: scale must be contiguous float32 ", w.sizes().slice(0, w.dim() - 1), ", got ",
              scale.scalar_type(), " ", scale.sizes());
  simd = simd && cpu_has_avx2();
  const int64_t K = w.size(-1), rows = K == 0 ? 0 : w.numel() / K;
  const float qmax = qt == at::kChar ? 127.0f : 448.0f;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(K, 1));
  auto run = [&](const auto* in, auto* out) {
    using In = std::remove_const_t<std::remove_pointer_t<decltype(in)>>;
    using Q = std::remove_pointer_t<decltype(out)>;
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      std::vector<float> row(K);
      quantize_rows<In, Q>(in, out, scale.data_ptr<float>(), r0, r1, K, qmax, simd, row.data());
    });
  };
  auto with_out = [&](const auto* in) {
    if (qt == at::kChar) run(in, data.data_ptr<int8_t>());
    else run(in, data.data_ptr<c10::Float8_e4m3fn>());
  };
  if (wt == at::kBFloat16) with_out(w.data_ptr<c10::BFloat16>());
  else if (wt == at::kHalf) with_out(w.data_ptr<c10::Half>());
  else with_out(w.data_ptr<float>());
}

// See kernels/cpu/__init__.py `dequantize`.
at::Tensor dequantize(const at::Tensor& data, const at::Tensor& scale, at::ScalarType dtype, bool simd) {
  const bool fp8 = data.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK((data.scalar_type() == at::kChar || fp8) && data.dim() >= 1 && data.is_contiguous(),
              "dequantize: data must be contiguous int8 or float8_e4m3fn [..., N, K], got ", data.scalar_type(),
              " ", data.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  scale.sizes() == data.sizes().slice(0, data.dim() - 1),
              "dequantize: scale must be contiguous float32 ", data.sizes().slice(0, data.dim() - 1), ", got ",
              scale.scalar_type(), " ", scale.sizes());
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat,
              "dequantize: dtype must be bfloat16, float16 or float32, got ", dtype);
  simd = simd && cpu_has_avx2();
  at::Tensor out = at::empty(data.sizes(), data.options().dtype(dtype));
  const int64_t K = data.size(-1), rows = K == 0 ? 0 : data.numel() / K;
  const float* s = scale.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(K, 1));
  auto run = [&](const auto* q, auto* o) {
    using Q = std::remove_const_t<std::remove_pointer_t<decltype(q)>>;
    using Out = std::remove_pointer_t<decltype(o)>;
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      if (simd)
        dequantize_rows_avx2<Q, Out>(q, s, o, r0, r1, K);
      else
        dequantize_rows_scalar<Q, Out>(q, s, o, r0, r1, K);
    });
  };
  auto with_out = [&](const auto* q) {
    if (dtype == at::kBFloat16) run(q, out.data_ptr<c10::BFloat16>());
    else if (dtype == at::kHalf) run(q, out.data_ptr<c10::Half>());
    else run(q, out.data_ptr<float>());
  };
  if (fp8) with_out(data.data_ptr<c10::Float8_e4m3fn>());
  else with_out(data.data_ptr<int8_t>());
  return out;
}

}  // namespace moe_cpu
