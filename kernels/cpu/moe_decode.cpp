// The MoE layer for a few tokens (decode) in one native call: router GEMV, softmax, top-k, the routed
// experts' SwiGLU MLPs and the weighted sum, with no tensor op in between.
//
// Why: at batch 1 a layer's expert work is two GEMV pairs (~2.8 ms for mini in bf16 on one core); the
// torch ops around them (routing, gathers, conversions, SiLU, the weighting: ~40 small ops) cost as much as
// a third of that again in dispatch. Here they are loops over a few rows.
//
// Rounding follows the torch backend (`torch_moe._expert_mlp`, itself the reference's): router logits and
// each GEMM result rounded to the activation dtype, SiLU and the gate * up product in it, the routing
// weight applied in fp32 and the k pairs of a token summed in fp32 in k order, rounded once at the end by
// the caller. Only the GEMMs' summation order differs (tests/kernels/test_cpu_moe.py).
//
// int8 experts (kernels/quant.py: one fp32 scale per output row) take the same path: the GEMMs widen the
// int8 values in registers and accumulate in fp32, and each output column is multiplied by its row's scale
// before the rounding above, which is the reference on the dequantized weights up to the weights' own
// rounding to the activation dtype there. Half the bytes of bf16 per expert read.

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "gemv.h"
#include "numerics.h"

namespace moe_cpu {
namespace {

// Scratch of one layer call, sized for n rows of one expert.
struct ExpertBuffers {
  std::vector<float> rows, h13, act, y;
  ExpertBuffers(int64_t n, int64_t H, int64_t I) : rows(n * H), h13(n * 2 * I), act(n * I), y(n * H) {}
};

// y[n, H] = w2 @ act(w13 @ x) for rows x[n, H] (fp32 values of Act), each result rounded to Act.
// s13 [2I], s2 [H]: the weights' per-row scales (int8), or null (16-bit).
template <typename W, typename Act>
void expert_rows(const float* x, int64_t n, int64_t H, int64_t I, const W* w13, const W* w2, const float* s13,
                 const float* s2, float* y, ExpertBuffers& buf, bool simd) {
  gemm(x, H, w13, H, buf.h13.data(), 2 * I, n, 2 * I, H, simd);  // [n, 2I]: gate columns, then up
  scale_columns(buf.h13.data(), n, 2 * I, s13);
  for (int64_t i = 0; i < n; ++i) {
    const float* h = buf.h13.data() + i * 2 * I;
    if (simd)
      silu_mul_avx2<Act>(h, h + I, buf.act.data() + i * I, I);
    else
      silu_mul_scalar<Act>(h, h + I, buf.act.data() + i * I, I);
  }
  gemm(buf.act.data(), I, w2, I, y, H, n, H, I, simd);  // [n, H]
  scale_columns(y, n, H, s2);
  round_all<Act>(y, n * H, simd);
}

// out[t, :] (fp32, [T, H]) = sum over j < k, in j order, of weights[t, j] * expert_{slots[t, j]}(x[t]);
// slot -1 contributes nothing. x [T, H] fp32 values of Act; w13 [S, 2I, H], w2 [S, H, I] contiguous;
// s13 [S, 2I], s2 [S, H] their per-row scales (int8) or null (16-bit).
template <typename W, typename Act>
void experts(const float* x, int64_t T, int64_t H, int64_t I, int64_t S, const W* w13, const W* w2,
             const float* s13, const float* s2, const int64_t* slots, const float* weights, int64_t k, float* out,
             bool simd) {
  std::vector<std::vector<int64_t>> groups(S);  // pair indices t * k + j of each slot, in pair order
  for (int64_t p = 0; p < T * k; ++p)
    if (slots[p] >= 0) groups[slots[p]].push_back(p);
  size_t largest = 0;
  for (const std::vector<int64_t>& g : groups) largest = std::max(largest, g.size());
  std::vector<float> pairs(T * k * H, 0.f);  // [T*k, H] weighted expert outputs
  ExpertBuffers buf(static_cast<int64_t>(largest), H, I);
  for (int64_t s = 0; s < S; ++s) {
    const std::vector<int64_t>& g = groups[s];
    const int64_t n = static_cast<int64_t>(g.size());
    if (n == 0) continue;
    for (int64_t i = 0; i < n; ++i) std::copy_n(x + (g[i] / k) * H, H, buf.rows.data() + i * H);
    expert_rows<W, Act>(buf.rows.data(), n, H, I, w13 + s * 2 * I * H, w2 + s * H * I,
                        s13 ? s13 + s * 2 * I : nullptr, s2 ? s2 + s * H : nullptr, buf.y.data(), buf, simd);
    for (int64_t i = 0; i < n; ++i) {
      const float wgt = weights[g[i]];
      float* dst = pairs.data() + g[i] * H;
      const float* src = buf.y.data() + i * H;
      for (int64_t h = 0; h < H; ++h) dst[h] = src[h] * wgt;
    }
  }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      float acc = pairs[(t * k) * H + h];
      for (int64_t j = 1; j < k; ++j) acc += pairs[(t * k + j) * H + h];
      out[t * H + h] = acc;
    }
}

// Mixtral's routing of one token: softmax over E logits (fp32), the k largest (ties: lower expert id
// first, as a stable sort), weights renormalized to sum to 1. ids and weights get k entries each.
void route_one(const float* logits, int64_t E, int64_t k, int64_t* ids, float* weights) {
  float mx = logits[0];
  for (int64_t e = 1; e < E; ++e) mx = std::max(mx, logits[e]);
  std::vector<float> p(E);
  float sum = 0.f;
  for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(logits[e] - mx));
  for (int64_t e = 0; e < E; ++e) p[e] /= sum;
  std::vector<bool> taken(E, false);
  float total = 0.f;
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; ++e)
      if (!taken[e] && (best < 0 || p[e] > p[best])) best = e;
    taken[best] = true;
    ids[j] = best;
    total += (weights[j] = p[best]);
  }
  for (int64_t j = 0; j < k; ++j) weights[j] /= total;
}

// Dispatch on the weights' dtype (bf16 / fp16, or int8) and the activations' (the same 16-bit dtype, or
// fp32; any of the three for int8).
template <typename F>
void dispatch(const at::Tensor& w, at::ScalarType act, const F& f) {
  auto eight_bit = [&](auto q) {
    TORCH_CHECK(act == at::kBFloat16 || act == at::kHalf || act == at::kFloat, "moe: activations of ",
                w.scalar_type(), " experts must be bfloat16, float16 or float32, got ", act);
    if (act == at::kFloat) f(q, float{});
    else if (act == at::kBFloat16) f(q, c10::BFloat16{});
    else f(q, c10::Half{});
  };
  if (w.scalar_type() == at::kChar) return eight_bit(int8_t{});
  if (w.scalar_type() == at::kFloat8_e4m3fn) return eight_bit(c10::Float8_e4m3fn{});
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf,
              "moe: expert weights must be bfloat16, float16, int8 or float8_e4m3fn, got ", w.scalar_type());
  TORCH_CHECK(act == w.scalar_type() || act == at::kFloat, "moe: activations must be ", w.scalar_type(),
              " or float32, got ", act);
  if (w.scalar_type() == at::kBFloat16) {
    if (act == at::kFloat) f(c10::BFloat16{}, float{}); else f(c10::BFloat16{}, c10::BFloat16{});
  } else {
    if (act == at::kFloat) f(c10::Half{}, float{}); else f(c10::Half{}, c10::Half{});
  }
}

void check_experts(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2) {
  TORCH_CHECK(hidden.dim() == 2 && w13.dim() == 3 && w2.dim() == 3,
              "moe: hidden [T, H], w13 [S, 2I, H] and w2 [S, H, I] expected, got ", hidden.sizes(), ", ",
              w13.sizes(), ", ", w2.sizes());
  const int64_t H = hidden.size(1), S = w13.size(0);
  TORCH_CHECK(w13.size(2) == H && w2.size(0) == S && w2.size(1) == H && w13.size(1) == 2 * w2.size(2),
              "moe: shapes disagree: hidden ", hidden.sizes(), ", w13 ", w13.sizes(), ", w2 ", w2.sizes());
  TORCH_CHECK(w13.is_contiguous() && w2.is_contiguous() && w13.scalar_type() == w2.scalar_type(),
              "moe: w13 and w2 must be contiguous and of one dtype");
}

bool is_8bit(const at::Tensor& w) { return w.scalar_type() == at::kChar || w.scalar_type() == at::kFloat8_e4m3fn; }

// The per-row scales of 8-bit experts (int8, float8_e4m3fn): both given, fp32, contiguous, [S, 2I] and [S, H]; for 16-bit
// experts neither. Returns their data pointers (null for 16-bit).
std::pair<const float*, const float*> scales_of(const at::Tensor& w13, const at::Tensor& w2,
                                                const std::optional<at::Tensor>& s13,
                                                const std::optional<at::Tensor>& s2) {
  const bool q = is_8bit(w13);
  TORCH_CHECK(q == s13.has_value() && q == s2.has_value(), "moe: 8-bit experts need both scales (s13 [S, 2I], ",
              "s2 [S, H]); 16-bit experts take none. Weights ", w13.scalar_type(), ", scales given: ",
              s13.has_value(), ", ", s2.has_value());
  if (!q) return {nullptr, nullptr};
  const int64_t S = w13.size(0);
  for (const at::Tensor* s : {&*s13, &*s2})
    TORCH_CHECK(s->scalar_type() == at::kFloat && s->is_contiguous() && s->dim() == 2 && s->size(0) == S,
                "moe: scales must be contiguous float32 [S, rows], got ", s->scalar_type(), " ", s->sizes());
  TORCH_CHECK(s13->size(1) == w13.size(1) && s2->size(1) == w2.size(1), "moe: scales ", s13->sizes(), " and ",
              s2->sizes(), " do not match w13 ", w13.sizes(), " and w2 ", w2.sizes(), " (one per row)");
  return {s13->data_ptr<float>(), s2->data_ptr<float>()};
}

}  // namespace

// See kernels/cpu/__init__.py `moe_fp32`.
at::Tensor moe_fp32(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2, const at::Tensor& slots,
                    const at::Tensor& weights, bool simd, const std::optional<at::Tensor>& s13,
                    const std::optional<at::Tensor>& s2) {
  simd = simd && cpu_has_avx2();
  check_experts(hidden, w13, w2);
  const auto [sc13, sc2] = scales_of(w13, w2, s13, s2);
  const int64_t T = hidden.size(0), H = hidden.size(1), S = w13.size(0), I = w2.size(2);
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == T && weights.sizes() == slots.sizes(), "moe: slots ",
              slots.sizes(), " and weights ", weights.sizes(), " must both be [T, k] with T = ", T);
  const int64_t k = slots.size(1);
  const at::Tensor x = hidden.to(at::kFloat).contiguous();
  const at::Tensor sl = slots.to(at::kLong).contiguous();
  const at::Tensor wt = weights.to(at::kFloat).contiguous();
  const int64_t* sp = sl.data_ptr<int64_t>();
  for (int64_t p = 0; p < T * k; ++p)
    TORCH_CHECK(sp[p] >= -1 && sp[p] < S, "moe: slot ", sp[p], " of pair ", p, " outside [-1, ", S, ")");
  at::Tensor out = at::empty({T, H}, x.options());
  dispatch(w13, hidden.scalar_type(), [&](auto w, auto a) {
    using W = decltype(w);
    using Act = decltype(a);
    experts<W, Act>(x.data_ptr<float>(), T, H, I, S, w13.data_ptr<W>(), w2.data_ptr<W>(), sc13, sc2, sp,
                    wt.data_ptr<float>(), k, out.data_ptr<float>(), simd);
  });
  return out;
}

// See kernels/cpu/__init__.py `expert_mlp`.
at::Tensor expert_mlp(const at::Tensor& rows, const at::Tensor& w13, const at::Tensor& w2,
                      const std::optional<at::Tensor>& s13, const std::optional<at::Tensor>& s2) {
  TORCH_CHECK(w13.dim() == 2 && w2.dim() == 2, "expert_mlp: w13 [2I, H] and w2 [H, I] expected, got ",
              w13.sizes(), " and ", w2.sizes());
  const at::Tensor w13c = w13.contiguous().unsqueeze(0), w2c = w2.contiguous().unsqueeze(0);
  check_experts(rows, w13c, w2c);
  const std::optional<at::Tensor> s13c = s13 ? std::optional<at::Tensor>(s13->unsqueeze(0)) : std::nullopt;
  const std::optional<at::Tensor> s2c = s2 ? std::optional<at::Tensor>(s2->unsqueeze(0)) : std::nullopt;
  const auto [sc13, sc2] = scales_of(w13c, w2c, s13c, s2c);
  const int64_t n = rows.size(0), H = rows.size(1), I = w2.size(1);
  const at::Tensor x = rows.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({n, H}, x.options());
  ExpertBuffers buf(n, H, I);
  dispatch(w13, rows.scalar_type(), [&](auto w, auto a) {
    using W = decltype(w);
    expert_rows<W, decltype(a)>(x.data_ptr<float>(), n, H, I, w13c.data_ptr<W>(), w2c.data_ptr<W>(), sc13, sc2,
                                y.data_ptr<float>(), buf, cpu_has_avx2());
  });
  return y.to(rows.scalar_type());
}

// See kernels/cpu/__init__.py `moe_decode`.
at::Tensor moe_decode(const at::Tensor& hidden, const at::Tensor& gate, const at::Tensor& w13, const at::Tensor& w2,
                      int64_t top_k, at::Tensor& counts, bool simd, const std::optional<at::Tensor>& s13,
                      const std::optional<at::Tensor>& s2) {
  simd = simd && cpu_has_avx2();
  check_experts(hidden, w13, w2);
  const auto [sc13, sc2] = scales_of(w13, w2, s13, s2);
  const int64_t T = hidden.size(0), H = hidden.size(1), E = w13.size(0), I = w2.size(2);
  TORCH_CHECK(gate.dim() == 2 && gate.size(0) == E && gate.size(1) == H && gate.stride(1) == 1 &&
                  (is_8bit(w13) ? gate.scalar_type() == at::kBFloat16 || gate.scalar_type() == at::kHalf
                                                  : gate.scalar_type() == w13.scalar_type()),
              "moe_decode: gate must be [E, H] = [", E, ", ", H, "] with unit stride along H in ",
              is_8bit(w13) ? "bfloat16 or float16" : c10::toString(w13.scalar_type()), ", got ",
              gate.sizes(), " ", gate.scalar_type());
  TORCH_CHECK(top_k >= 1 && top_k <= E, "moe_decode: top_k ", top_k, " outside [1, ", E, "]");
  TORCH_CHECK(counts.dim() == 1 && counts.size(0) == E && counts.scalar_type() == at::kLong && counts.is_contiguous(),
              "moe_decode: counts must be a contiguous int64 [", E, "], got ", counts.sizes(), " ", counts.scalar_type());
  const at::Tensor x = hidden.to(at::kFloat).contiguous();
  std::vector<float> logits(T * E), weights(T * top_k);
  std::vector<int64_t> ids(T * top_k);
  at::Tensor out = at::empty({T, H}, x.options());
  int64_t* cnt = counts.data_ptr<int64_t>();
  if (gate.scalar_type() == at::kBFloat16)  // the router in the dense weights' dtype, whatever the experts'
    gemm(x.data_ptr<float>(), H, gate.data_ptr<c10::BFloat16>(), gate.stride(0), logits.data(), E, T, E, H, simd);
  else
    gemm(x.data_ptr<float>(), H, gate.data_ptr<c10::Half>(), gate.stride(0), logits.data(), E, T, E, H, simd);
  dispatch(w13, hidden.scalar_type(), [&](auto w, auto a) {
    using W = decltype(w);
    using Act = decltype(a);
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t e = 0; e < E; ++e) logits[t * E + e] = round_to<Act>(logits[t * E + e]);
      route_one(logits.data() + t * E, E, top_k, ids.data() + t * top_k, weights.data() + t * top_k);
    }
    for (int64_t id : ids) ++cnt[id];
    experts<W, Act>(x.data_ptr<float>(), T, H, I, E, w13.data_ptr<W>(), w2.data_ptr<W>(), sc13, sc2, ids.data(),
                    weights.data(), top_k, out.data_ptr<float>(), simd);
  });
  return out.to(hidden.scalar_type());
}

}  // namespace moe_cpu
