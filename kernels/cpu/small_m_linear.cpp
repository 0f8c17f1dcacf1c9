// Small-M linear layers with 16-bit weights on CPU: y[M, N] = x[M, K] @ W[N, K]^T, fp32 accumulation
// (the core is gemv.h), and the Python bindings of every native CPU op of this folder.

#include <torch/extension.h>

#include <cstdint>
#include <optional>

#include "gemv.h"

namespace moe_cpu {

// Defined in moe_decode.cpp, attention_decode.cpp and rms_norm.cpp.
at::Tensor moe_fp32(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2, const at::Tensor& slots,
                    const at::Tensor& weights, bool simd, const std::optional<at::Tensor>& s13,
                    const std::optional<at::Tensor>& s2);
at::Tensor expert_mlp(const at::Tensor& rows, const at::Tensor& w13, const at::Tensor& w2,
                      const std::optional<at::Tensor>& s13, const std::optional<at::Tensor>& s2);
at::Tensor moe_decode(const at::Tensor& hidden, const at::Tensor& gate, const at::Tensor& w13, const at::Tensor& w2,
                      int64_t top_k, at::Tensor& counts, bool simd, const std::optional<at::Tensor>& s13,
                      const std::optional<at::Tensor>& s2);
at::Tensor attention_decode(const at::Tensor& x, const at::Tensor& w_qkv, const at::Tensor& w_o, const at::Tensor& cos,
                            const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                            const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, int64_t n_heads, int64_t n_kv_heads,
                            int64_t sliding_window, bool simd, const std::optional<at::Tensor>& s_qkv,
                            const std::optional<at::Tensor>& s_o);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, std::optional<at::Tensor> residual,
                    bool simd);
at::Tensor dequantize(const at::Tensor& data, const at::Tensor& scale, at::ScalarType dtype, bool simd);
void quantize_into(const at::Tensor& w, at::Tensor& data, at::Tensor& scale, bool simd);

namespace {

// y[M, N] fp32 = x @ w^T. Checks shapes, dtypes and strides; widens x to fp32 when needed. w is 16-bit, or
// int8 / float8_e4m3fn with its per-row fp32 `scale` [N] (kernels/quant.py): output column n is scaled by
// scale[n] once.
// `simd` false forces the scalar fallback (tests compare both paths on AVX2 machines).
at::Tensor linear_fp32(const at::Tensor& x_in, const at::Tensor& w, bool simd, const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(x_in.dim() == 2 && w.dim() == 2, "linear: x must be [M, K] and w [N, K], got x ", x_in.sizes(),
              ", w ", w.sizes());
  TORCH_CHECK(x_in.size(1) == w.size(1), "linear: x [M, K] and w [N, K] disagree on K: x ", x_in.sizes(),
              ", w ", w.sizes());
  TORCH_CHECK(x_in.device().is_cpu() && w.device().is_cpu(), "linear: CPU tensors only");
  const bool q = w.scalar_type() == at::kChar || w.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(q || w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf,
              "linear: w must be bfloat16, float16, int8 or float8_e4m3fn, got ", w.scalar_type());
  TORCH_CHECK(q == scale.has_value(), "linear: 8-bit weights need their per-row scale [N] and 16-bit weights take ",
              "none; w ", w.scalar_type(), ", scale given: ", scale.has_value());
  if (q)
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->is_contiguous() && scale->dim() == 1 &&
                    scale->size(0) == w.size(0),
                "linear: scale must be contiguous float32 [", w.size(0), "], got ", scale->scalar_type(), " ",
                scale->sizes());
  TORCH_CHECK(w.stride(1) == 1 || w.size(1) <= 1, "linear: w rows must have unit stride along K, got strides ",
              w.strides());
  simd = simd && cpu_has_avx2();
  at::Tensor x = x_in;
  if (x.scalar_type() != at::kFloat || (x.stride(1) != 1 && x.size(1) > 1)) x = x.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();
  const float* xp = x.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldw = w.stride(0);
  if (q) {
    if (w.scalar_type() == at::kChar)
      gemm(xp, ldx, w.data_ptr<int8_t>(), ldw, y.data_ptr<float>(), N, M, N, K, simd);
    else
      gemm(xp, ldx, w.data_ptr<c10::Float8_e4m3fn>(), ldw, y.data_ptr<float>(), N, M, N, K, simd);
    scale_columns(y.data_ptr<float>(), M, N, scale->data_ptr<float>());
  } else if (w.scalar_type() == at::kBFloat16) {
    gemm(xp, ldx, w.data_ptr<c10::BFloat16>(), ldw, y.data_ptr<float>(), N, M, N, K, simd);
  } else {
    gemm(xp, ldx, w.data_ptr<c10::Half>(), ldw, y.data_ptr<float>(), N, M, N, K, simd);
  }
  return y;
}

bool has_avx2() { return cpu_has_avx2(); }

bool has_avx512_bf16() { return cpu_has_avx512_bf16(); }

int64_t set_dot_bf16_min_rows(int64_t rows) {
  TORCH_CHECK(rows >= 0, "set_dot_bf16_min_rows: rows must be >= 0 (0: never), got ", rows);
  return dot_bf16_min_rows().exchange(rows);
}

int64_t set_dot_fp8_min_rows(int64_t rows) {
  TORCH_CHECK(rows >= 0, "set_dot_fp8_min_rows: rows must be >= 0 (0: never), got ", rows);
  return dot_fp8_min_rows().exchange(rows);
}

int64_t set_dot_int8_min_rows(int64_t rows) {
  TORCH_CHECK(rows >= 0, "set_dot_int8_min_rows: rows must be >= 0 (0: never), got ", rows);
  return dot_int8_min_rows().exchange(rows);
}

}  // namespace
}  // namespace moe_cpu

// Documented in kernels/cpu/__init__.py, which wraps each. `simd` false forces the scalar fallback of
// any CPU (tests compare both paths on AVX2 machines).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace moe_cpu;
  m.def("has_avx2", &has_avx2, "whether this CPU has AVX2, FMA and F16C");
  m.def("has_avx512_bf16", &has_avx512_bf16, "whether this CPU has AVX512-BF16 (vdpbf16ps) and AVX512-BW");
  m.def("set_dot_bf16_min_rows", &set_dot_bf16_min_rows, "the fewest rows of 16-bit x the vdpbf16ps tiles take "
        "(0: never), for the process; returns the previous value", py::arg("rows"));
  m.def("set_dot_int8_min_rows", &set_dot_int8_min_rows, "the same for GEMMs of int8 weights (their own switch "
        "point)", py::arg("rows"));
  m.def("set_dot_fp8_min_rows", &set_dot_fp8_min_rows, "the same for GEMMs of float8_e4m3fn weights",
        py::arg("rows"));
  m.def("linear_fp32", &linear_fp32, "y[M, N] fp32 = x[M, K] @ w[N, K]^T, 16-bit w (or int8 w with its row scales)",
        py::arg("x"), py::arg("w"), py::arg("simd") = true, py::arg("scale") = py::none());
  // s13, s2: the per-row fp32 scales of int8 experts (kernels/quant.py); None for 16-bit experts.
  m.def("expert_mlp", &expert_mlp, "one expert's SwiGLU MLP, the torch backend's rounding", py::arg("rows"),
        py::arg("w13"), py::arg("w2"), py::arg("s13") = py::none(), py::arg("s2") = py::none());
  m.def("moe_fp32", &moe_fp32, "a MoE layer of small expert groups, fp32 result", py::arg("hidden"), py::arg("w13"),
        py::arg("w2"), py::arg("slots"), py::arg("weights"), py::arg("simd") = true, py::arg("s13") = py::none(),
        py::arg("s2") = py::none());
  m.def("moe_decode", &moe_decode, "router + experts of a few tokens, in the activation dtype", py::arg("hidden"),
        py::arg("gate"), py::arg("w13"), py::arg("w2"), py::arg("top_k"), py::arg("counts"), py::arg("simd") = true,
        py::arg("s13") = py::none(), py::arg("s2") = py::none());
  m.def("attention_decode", &attention_decode, "qkv, RoPE, KV cache write, paged attention and o_proj of one-token "
        "queries", py::arg("x"), py::arg("w_qkv"), py::arg("w_o"), py::arg("cos"), py::arg("sin"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("slot_mapping"), py::arg("block_tables"), py::arg("context_lens"),
        py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("sliding_window"), py::arg("simd") = true,
        py::arg("s_qkv") = py::none(), py::arg("s_o") = py::none());
  m.def("quantize_into", &quantize_into, "w [..., N, K] 16-bit or fp32 -> int8 / float8_e4m3fn data with fp32 row "
        "scales, in place", py::arg("w"), py::arg("data"), py::arg("scale"), py::arg("simd") = true);
  m.def("dequantize", &dequantize, "int8 [..., N, K] times fp32 row scales [..., N], rounded once to dtype",
        py::arg("data"), py::arg("scale"), py::arg("dtype"), py::arg("simd") = true);
  m.def("rms_norm", &rms_norm, "RMSNorm, optionally after residual += x", py::arg("x"), py::arg("w"), py::arg("eps"),
        py::arg("residual") = py::none(), py::arg("simd") = true);
}
