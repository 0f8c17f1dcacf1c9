// RMSNorm of a few rows, optionally after the residual add, in one native call (decode).
//
// out = w * round(x * rsqrt(mean(x^2) + eps)) with x in fp32, the reference's rounding points
// (model/mixtral.py `RMSNorm`). With `residual`: residual += x first, in place and rounded to the
// activation dtype (the model's `h = h + block(h)`), and the sum is what gets normalized. Only the order
// of the mean's sum differs from torch.

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "numerics.h"

namespace moe_cpu {
namespace {

// The same for 16-bit Act with AVX2 (D % 8 == 0): the sum of squares in eight lanes, the rest exact.
template <typename Act>
AVX2_FN void run_avx2(const Act* x, Act* residual, const Act* w, Act* out, int64_t T, int64_t D, float eps) {
  for (int64_t t = 0; t < T; ++t) {
    const Act* src = x + t * D;
    if (residual != nullptr) {
      Act* r = residual + t * D;
      for (int64_t i = 0; i < D; i += 8) store8(r + i, round8<Act>(_mm256_add_ps(load8(r + i), load8(src + i))));
      src = r;
    }
    __m256 ss = _mm256_setzero_ps();
    for (int64_t i = 0; i < D; i += 8) {
      const __m256 v = load8(src + i);
      ss = _mm256_fmadd_ps(v, v, ss);
    }
    const __m256 inv = _mm256_set1_ps(1.f / std::sqrt(hsum(ss) / static_cast<float>(D) + eps));
    for (int64_t i = 0; i < D; i += 8)
      store8(out + t * D + i, round8<Act>(_mm256_mul_ps(load8(w + i), round8<Act>(_mm256_mul_ps(load8(src + i), inv)))));
  }
}

template <typename Act>
void run(const Act* x, Act* residual, const Act* w, Act* out, int64_t T, int64_t D, float eps) {
  for (int64_t t = 0; t < T; ++t) {
    const Act* src = x + t * D;
    if (residual != nullptr) {
      Act* r = residual + t * D;
      for (int64_t i = 0; i < D; ++i) r[i] = Act(static_cast<float>(r[i]) + static_cast<float>(src[i]));
      src = r;
    }
    float ss = 0.f;
    for (int64_t i = 0; i < D; ++i) ss += static_cast<float>(src[i]) * static_cast<float>(src[i]);
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
    for (int64_t i = 0; i < D; ++i)
      out[t * D + i] = Act(static_cast<float>(w[i]) * round_to<Act>(static_cast<float>(src[i]) * inv));
  }
}

}  // namespace

// See kernels/cpu/__init__.py `rms_norm`.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, std::optional<at::Tensor> residual,
                    bool simd) {
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && w.size(0) == x.size(1), "rms_norm: x [T, D] and w [D] expected, got ",
              x.sizes(), " and ", w.sizes());
  TORCH_CHECK(w.scalar_type() == dt && x.is_contiguous() && w.is_contiguous(),
              "rms_norm: x and w must be contiguous and of one dtype, got ", dt, " and ", w.scalar_type());
  if (residual.has_value())
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == dt && residual->is_contiguous(),
                "rms_norm: residual must be a contiguous ", dt, " ", x.sizes(), ", got ", residual->sizes(), " ",
                residual->scalar_type());
  at::Tensor out = at::empty_like(x);
  const int64_t T = x.size(0), D = x.size(1);
  simd = simd && cpu_has_avx2() && D % 8 == 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "rms_norm", [&] {
    scalar_t* res = residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>) {
      if (simd)
        return run_avx2<scalar_t>(x.data_ptr<scalar_t>(), res, w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), T, D,
                                  static_cast<float>(eps));
    }
    run<scalar_t>(x.data_ptr<scalar_t>(), res, w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), T, D,
                  static_cast<float>(eps));
  });
  return out;
}

}  // namespace moe_cpu
