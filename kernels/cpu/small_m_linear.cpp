// Small-M linear layers with 16-bit weights on CPU: y[M, N] = x[M, K] @ W[N, K]^T, fp32 accumulation.
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
// scalar fallback runs anywhere; `has_avx2()` picks at run time.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

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

bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}

// Weight rows per parallel task: a multiple of both register blocks (8 and 4).
constexpr int64_t kRowsPerTask = 16;

template <typename W>
void run(const float* x, int64_t ldx, const W* w, int64_t ldw, float* y, int64_t M, int64_t N, int64_t K,
         bool simd) {
  const int64_t tasks = (N + kRowsPerTask - 1) / kRowsPerTask;
  // Below ~64k weight elements per thread, a parallel region costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (K * kRowsPerTask));
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    const int64_t n0 = t0 * kRowsPerTask, n1 = std::min(N, t1 * kRowsPerTask);
    if (simd)
      rows_avx2<W>(x, ldx, w, ldw, y, N, M, n0, n1, K);
    else
      rows_scalar<W>(x, ldx, w, ldw, y, N, M, n0, n1, K);
  });
}

// y[M, N] fp32 = x @ w^T. Checks shapes, dtypes and strides; widens x to fp32 when needed.
at::Tensor linear_fp32_impl(const at::Tensor& x_in, const at::Tensor& w, bool simd) {
  TORCH_CHECK(x_in.dim() == 2 && w.dim() == 2, "linear: x must be [M, K] and w [N, K], got x ", x_in.sizes(),
              ", w ", w.sizes());
  TORCH_CHECK(x_in.size(1) == w.size(1), "linear: x [M, K] and w [N, K] disagree on K: x ", x_in.sizes(),
              ", w ", w.sizes());
  TORCH_CHECK(x_in.device().is_cpu() && w.device().is_cpu(), "linear: CPU tensors only");
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf,
              "linear: w must be bfloat16 or float16, got ", w.scalar_type());
  TORCH_CHECK(w.stride(1) == 1 || w.size(1) <= 1, "linear: w rows must have unit stride along K, got strides ",
              w.strides());
  at::Tensor x = x_in;
  if (x.scalar_type() != at::kFloat || (x.stride(1) != 1 && x.size(1) > 1)) x = x.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();
  const float* xp = x.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldw = w.stride(0);
  if (w.scalar_type() == at::kBFloat16)
    run(xp, ldx, w.data_ptr<c10::BFloat16>(), ldw, y.data_ptr<float>(), M, N, K, simd);
  else
    run(xp, ldx, w.data_ptr<c10::Half>(), ldw, y.data_ptr<float>(), M, N, K, simd);
  return y;
}

}  // namespace

// ------------------------------------------------------------------------------------------------------
// Python entry points (moe_runtime.kernels.cpu wraps them).

bool has_avx2() { return cpu_has_avx2(); }

// x [M, K] (any float dtype, unit stride along K or copied), w [N, K] 16-bit -> [M, N] fp32.
// `simd` false forces the scalar fallback (tests compare both paths on AVX2 machines).
at::Tensor linear_fp32(const at::Tensor& x, const at::Tensor& w, bool simd) {
  return linear_fp32_impl(x, w, simd && cpu_has_avx2());
}

namespace {

// One expert's SwiGLU MLP at the rounding points of the torch backend (torch_moe._expert_mlp, itself the
// reference's): both GEMM results rounded to `dt`, SiLU and the gate * up product in `dt`. Only the GEMMs'
// summation order differs (fp32 accumulation both ways). rows [n, H] (any dtype, values of `dt`).
at::Tensor expert_mlp_impl(const at::Tensor& rows, const at::Tensor& w13, const at::Tensor& w2,
                           at::ScalarType dt) {
  TORCH_CHECK(w13.dim() == 2 && w2.dim() == 2 && w13.size(0) == 2 * w2.size(1) && w2.size(0) == w13.size(1),
              "expert_mlp: w13 must be [2I, H] and w2 [H, I], got ", w13.sizes(), " and ", w2.sizes());
  const bool simd = cpu_has_avx2();
  at::Tensor h13 = linear_fp32_impl(rows, w13, simd).to(dt);  // [n, 2I]
  const int64_t I = w2.size(1);
  at::Tensor gate = h13.narrow(1, 0, I);  // [n, I], row stride 2I
  at::silu_(gate);
  gate.mul_(h13.narrow(1, I, I));
  return linear_fp32_impl(gate, w2, simd).to(dt);  // [n, H]
}

}  // namespace

// w2 @ (silu(x @ w1^T) * (x @ w3^T)) for one expert: rows [n, H]; w13 [2I, H] (gate rows then up rows);
// w2 [H, I] -> [n, H] in rows' dtype, rounded where the torch backend rounds.
at::Tensor expert_mlp(const at::Tensor& rows, const at::Tensor& w13, const at::Tensor& w2) {
  return expert_mlp_impl(rows, w13, w2, rows.scalar_type());
}

// A whole MoE layer whose expert groups are all small (decode), in one call: the Python version
// (torch_moe.run_experts_fp32 with expert_mlp) spends more time dispatching its small ops than the
// kernels take at batch 1. hidden [T, H]; w13 [S, 2I, H]; w2 [S, H, I] (16-bit); slots [T, k] integer slot
// of each (token, k) pair, -1 = not resident (contributes zero); weights [T, k] fp32. Returns [T, H] fp32:
// sum over j, in j order, of weights[t, j] * expert_{slots[t, j]}(hidden[t]).
at::Tensor moe_fp32(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2, const at::Tensor& slots,
                    const at::Tensor& weights) {
  TORCH_CHECK(hidden.dim() == 2 && w13.dim() == 3 && w2.dim() == 3 && slots.dim() == 2 && weights.dim() == 2,
              "moe: hidden [T, H], w13 [S, 2I, H], w2 [S, H, I], slots and weights [T, k] expected");
  const int64_t T = hidden.size(0), H = hidden.size(1), k = slots.size(1), S = w13.size(0);
  TORCH_CHECK(w13.size(2) == H && w2.size(0) == S && w2.size(1) == H && w13.size(1) == 2 * w2.size(2),
              "moe: shapes disagree: hidden ", hidden.sizes(), ", w13 ", w13.sizes(), ", w2 ", w2.sizes());
  TORCH_CHECK(slots.size(0) == T && weights.sizes() == slots.sizes(), "moe: slots ", slots.sizes(),
              " and weights ", weights.sizes(), " must both be [T, k] with T = ", T);
  const at::Tensor x = hidden.to(at::kFloat).contiguous();  // [T, H]
  const at::Tensor sl = slots.to(at::kLong).contiguous();
  const at::Tensor wt = weights.to(at::kFloat).contiguous();
  const int64_t* sp = sl.data_ptr<int64_t>();
  const float* wp = wt.data_ptr<float>();
  std::vector<std::vector<int64_t>> groups(S);  // pair indices t * k + j of each slot, in pair order
  for (int64_t p = 0; p < T * k; ++p) {
    TORCH_CHECK(sp[p] >= -1 && sp[p] < S, "moe: slot ", sp[p], " of pair ", p, " outside [-1, ", S, ")");
    if (sp[p] >= 0) groups[sp[p]].push_back(p);
  }
  at::Tensor pairs = at::zeros({T * k, H}, x.options());  // [T*k, H] weighted expert outputs
  at::Tensor rows = at::empty({T * k, H}, x.options());  // gather buffer
  float* pairs_p = pairs.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  for (int64_t s = 0; s < S; ++s) {
    const std::vector<int64_t>& g = groups[s];
    const int64_t n = static_cast<int64_t>(g.size());
    if (n == 0) continue;
    at::Tensor xr = rows.narrow(0, 0, n);  // [n, H]
    float* xr_p = xr.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) std::copy_n(xp + (g[i] / k) * H, H, xr_p + i * H);
    // [n, H] in hidden's dtype, widened again for the fp32 weighting (as run_experts_fp32)
    const at::Tensor y = expert_mlp_impl(xr, w13.select(0, s), w2.select(0, s), hidden.scalar_type()).to(at::kFloat);
    const float* yp = y.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {
      const float wgt = wp[g[i]];
      float* dst = pairs_p + g[i] * H;
      for (int64_t h = 0; h < H; ++h) dst[h] = yp[i * H + h] * wgt;
    }
  }
  if (k == 1) return pairs;
  at::Tensor out = at::empty({T, H}, x.options());
  float* op = out.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      float acc = pairs_p[(t * k) * H + h];
      for (int64_t j = 1; j < k; ++j) acc += pairs_p[(t * k + j) * H + h];
      op[t * H + h] = acc;
    }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("has_avx2", &has_avx2, "whether this CPU has AVX2, FMA and F16C");
  m.def("linear_fp32", &linear_fp32, "y[M, N] fp32 = x[M, K] @ w[N, K]^T, 16-bit w",
        py::arg("x"), py::arg("w"), py::arg("simd") = true);
  m.def("expert_mlp", &expert_mlp, "one expert's SwiGLU MLP, the torch backend's rounding", py::arg("rows"),
        py::arg("w13"), py::arg("w2"));
  m.def("moe_fp32", &moe_fp32, "a MoE layer of small expert groups, fp32 result", py::arg("hidden"),
        py::arg("w13"), py::arg("w2"), py::arg("slots"), py::arg("weights"));
}
