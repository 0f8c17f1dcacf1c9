// Dequantize int8 weights with per-row scales to a 16-bit or fp32 weight in one pass:
// out[r, k] = round(data[r, k] * scale[r]) in out's dtype (kernels/quant.py `QuantizedWeight.dequantize`,
// the same bits: an int8 times an fp32 scale is one fp32 product, rounded once).
//
// Why: expert groups of many rows (prefill) run torch's GEMMs on the dequantized expert where those win
// (oneDNN's AVX512-BF16 / AMX bf16 GEMMs; kernels/cpu/moe.py's `bf16` choice). Dequantizing with torch ops
// takes three passes and an fp32 temporary of the whole expert (mini's w13: 29 MB); this reads the int8
// values once and writes the result once, rows split over threads.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>

#include "numerics.h"
#include "vec.h"

namespace moe_cpu {
namespace {

template <typename Out>
AVX2_FN void dequantize_rows_avx2(const int8_t* q, const float* scale, Out* out, int64_t r0, int64_t r1, int64_t K) {
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* qr = q + r * K;
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

template <typename Out>
void dequantize_rows_scalar(const int8_t* q, const float* scale, Out* out, int64_t r0, int64_t r1, int64_t K) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t k = 0; k < K; ++k) out[r * K + k] = Out(static_cast<float>(q[r * K + k]) * scale[r]);
}

}  // namespace

// See kernels/cpu/__init__.py `dequantize`.
at::Tensor dequantize(const at::Tensor& data, const at::Tensor& scale, at::ScalarType dtype, bool simd) {
  TORCH_CHECK(data.scalar_type() == at::kChar && data.dim() >= 1 && data.is_contiguous(),
              "dequantize: data must be contiguous int8 [..., N, K], got ", data.scalar_type(), " ", data.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  scale.sizes() == data.sizes().slice(0, data.dim() - 1),
              "dequantize: scale must be contiguous float32 ", data.sizes().slice(0, data.dim() - 1), ", got ",
              scale.scalar_type(), " ", scale.sizes());
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat,
              "dequantize: dtype must be bfloat16, float16 or float32, got ", dtype);
  simd = simd && cpu_has_avx2();
  at::Tensor out = at::empty(data.sizes(), data.options().dtype(dtype));
  const int64_t K = data.size(-1), rows = K == 0 ? 0 : data.numel() / K;
  const int8_t* q = data.data_ptr<int8_t>();
  const float* s = scale.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(K, 1));
  auto run = [&](auto* o) {
    using Out = std::remove_pointer_t<decltype(o)>;
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      if (simd)
        dequantize_rows_avx2<Out>(q, s, o, r0, r1, K);
      else
        dequantize_rows_scalar<Out>(q, s, o, r0, r1, K);
    });
  };
  if (dtype == at::kBFloat16) run(out.data_ptr<c10::BFloat16>());
  else if (dtype == at::kHalf) run(out.data_ptr<c10::Half>());
  else run(out.data_ptr<float>());
  return out;
}

}  // namespace moe_cpu
