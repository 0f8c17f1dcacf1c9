// A decode step's attention block in one native call: q/k/v projection (one fused weight), RoPE, the KV
// cache write, attention of each one-token query over its paged context, and the output projection.
//
// Why: in torch ops this block is ~45 small ops per layer at batch 1 (conversions, RoPE's chunk / cat /
// mul / add, two index_copy_ into the cache, a gather of the pages, two matmuls, a softmax): ~0.35 ms of
// dispatch around 0.4 ms of GEMVs on one core of the 2-core AVX2 EPYC.
//
// Rounding follows the model (model/mixtral.py `Attention` with `attention_fp32`): q, k, v rounded to the
// activation dtype after the GEMM; RoPE as x * cos + rotate_half(x) * sin with each product and the sum
// rounded; scores, softmax and the weighted sum of values in fp32 (scale applied after the dot product),
// rounded once; the output projection rounded. Only summation orders differ.
//
// Layout: the KV cache of the layer is k_cache, v_cache [num_blocks, block_size, KVH, Dh]; token j of
// sequence t lives in row block_tables[t, j / block_size] * block_size + j % block_size.
//
// 8-bit projections (`model.quantize_dense`, kernels/quant.py): w_qkv and w_o int8 or float8_e4m3fn with one
// fp32 scale per row; each GEMM's output column is scaled once before its rounding (the GEMM core widens the int8 values
// in registers), so the step reads half the projection bytes of bf16.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "gemv.h"
#include "numerics.h"

namespace moe_cpu {
namespace {

// x[0:Dh] of one head rotated in place: x * cos + cat(-x2, x1) * sin, each product and sum rounded.
template <typename Act>
AVX2_FN void rope_avx2(float* x, const Act* cos, const Act* sin, int64_t Dh) {  // Dh % 16 == 0
  const int64_t half = Dh / 2;
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t i = 0; i < half; i += 8) {
    const __m256 x1 = _mm256_loadu_ps(x + i), x2 = _mm256_loadu_ps(x + i + half);
    const __m256 r1 = round8<Act>(_mm256_mul_ps(_mm256_xor_ps(x2, sign), load8(sin + i)));
    const __m256 r2 = round8<Act>(_mm256_mul_ps(x1, load8(sin + i + half)));
    _mm256_storeu_ps(x + i, round8<Act>(_mm256_add_ps(round8<Act>(_mm256_mul_ps(x1, load8(cos + i))), r1)));
    _mm256_storeu_ps(x + i + half,
                     round8<Act>(_mm256_add_ps(round8<Act>(_mm256_mul_ps(x2, load8(cos + i + half))), r2)));
  }
}

template <typename Act>
void rope(float* x, const Act* cos, const Act* sin, int64_t Dh, bool simd) {
  if (simd && Dh % 16 == 0) return rope_avx2(x, cos, sin, Dh);
  const int64_t half = Dh / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    const float c1 = cos[i], c2 = cos[i + half], s1 = sin[i], s2 = sin[i + half];
    x[i] = round_to<Act>(round_to<Act>(x1 * c1) + round_to<Act>(-x2 * s1));
    x[i + half] = round_to<Act>(round_to<Act>(x2 * c2) + round_to<Act>(x1 * s2));
  }
}

struct Dims {
  int64_t T, D, H, KVH, Dh, block_size, table_width, sliding_window;
};

// One task of `attend`: the `group` query heads q [group, Dh] (fp32) that share a KV head, over the n
// keys and values at element offsets rows[j] of kc / vc. o [group, Dh] gets the fp32 result; scores is
// scratch of group * n. Scores are q . k * scale, softmax per head, then the weighted sum of the values.
template <typename Act>
void attend_group_scalar(const float* q, const Act* kc, const Act* vc, const int64_t* rows, int64_t n,
                         int64_t group, int64_t Dh, float scale, float* scores, float* o) {
  for (int64_t r = 0; r < group; ++r) {
    float* s = scores + r * n;
    for (int64_t j = 0; j < n; ++j) {
      float acc = 0.f;
      for (int64_t i = 0; i < Dh; ++i) acc += q[r * Dh + i] * static_cast<float>(kc[rows[j] + i]);
      s[j] = acc * scale;
    }
    const float mx = *std::max_element(s, s + n);
    float sum = 0.f;
    for (int64_t j = 0; j < n; ++j) sum += (s[j] = std::exp(s[j] - mx));
    for (int64_t j = 0; j < n; ++j) s[j] /= sum;
    float* out = o + r * Dh;
    std::fill_n(out, Dh, 0.f);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < Dh; ++i) out[i] += s[j] * static_cast<float>(vc[rows[j] + i]);
  }
}

// ----------------------------------------------------------------------------------------------------
// The same with AVX2 (Dh a multiple of 8). Each key row is widened once for up to four query rows, the
// value rows' weighted sum stays in registers (16 dimensions at a time), the exponentials go eight at a
// time (`exp8`), and rows kKvPrefetch ahead are prefetched: a sequence's rows lie in random blocks of the
// cache, KVH * Dh elements apart within a block, a pattern the hardware prefetchers do not follow.
// Against the previous loop (each key widened once per query row, values summed through memory, no
// prefetch), mini's heads, batch 16, 8 layers' caches, one core (attention_decode less its GEMMs):
// 2.8 -> 0.8-1.1 ms per layer at 200 tokens of context, 13.5 -> 4-5 ms at 1000.
constexpr int64_t kKvPrefetch = 8;

template <typename Act>
AVX2_FN inline void prefetch_row(const Act* p, int64_t Dh) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < Dh * int64_t(sizeof(Act)); b += 64) _mm_prefetch(c + b, _MM_HINT_T0);
}

// scores[r * n + j] = scale * q_r . k_j for R query rows (q [R, Dh]); each key is widened once for all R
// rows, 16 elements at a time, two accumulators per row.
template <int R, typename Act>
AVX2_FN void scores_rows(const float* q, const Act* kc, const int64_t* rows, int64_t n, int64_t Dh,
                         float scale, float* scores) {
  for (int64_t j = 0; j < n; ++j) {
    if (j + kKvPrefetch < n) prefetch_row(kc + rows[j + kKvPrefetch], Dh);
    const Act* k = kc + rows[j];
    __m256 acc[R][2];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= Dh; i += 16) {
      const __m256 k0 = load8(k + i), k1 = load8(k + i + 8);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * Dh + i), k0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * Dh + i + 8), k1, acc[r][1]);
      }
    }
    if (i < Dh) {  // Dh % 16 == 8
      const __m256 k0 = load8(k + i);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * Dh + i), k0, acc[r][0]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) scores[r * n + j] = hsum(_mm256_add_ps(acc[r][0], acc[r][1])) * scale;
  }
}

// Value rows per pass over the head's dimensions: their 16-bit rows (16 KiB at Dh = 128) stay in L1 for
// the Dh / 16 passes, so each is read from memory once at any context length. Against passes over the
// whole context, Mixtral's heads (32 over 8 KV heads of 128), one core, three alternating runs: 1 token
// over 32768 of context 56-63 -> 38-50 ms per layer, 4 tokens over 8192 49-50 -> 40-50 ms.
constexpr int64_t kValueChunk = 64;

// o_r[d0:d0 + 8 * C] (+)= sum over j in [j0, j1) of p[r * n + j] * v_j[d0:...] for R rows, in registers
// (R * C accumulators); `add` continues the sums already in o.
template <int R, int C, typename Act>
AVX2_FN void values_rows(const float* p, const Act* vc, const int64_t* rows, int64_t n, int64_t j0, int64_t j1,
                         int64_t Dh, int64_t d0, float* o, bool add, bool prefetch) {
  __m256 acc[R][C];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int c = 0; c < C; ++c) acc[r][c] = add ? _mm256_loadu_ps(o + r * Dh + d0 + 8 * c) : _mm256_setzero_ps();
  for (int64_t j = j0; j < j1; ++j) {
    if (prefetch && j + kKvPrefetch < n) prefetch_row(vc + rows[j + kKvPrefetch], Dh);
    const Act* v = vc + rows[j] + d0;
    __m256 vv[C];
#pragma GCC unroll 2
    for (int c = 0; c < C; ++c) vv[c] = load8(v + 8 * c);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 pr = _mm256_broadcast_ss(p + r * n + j);
#pragma GCC unroll 2
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(pr, vv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int c = 0; c < C; ++c) _mm256_storeu_ps(o + r * Dh + d0 + 8 * c, acc[r][c]);
}

// R query rows of one KV group (R <= 4): scores, softmax, weighted values. Dh % 8 == 0.
template <int R, typename Act>
AVX2_FN void attend_rows_avx2(const float* q, const Act* kc, const Act* vc, const int64_t* rows, int64_t n,
                              int64_t Dh, float scale, float* scores, float* o) {
  scores_rows<R>(q, kc, rows, n, Dh, scale, scores);
  for (int64_t r = 0; r < R; ++r) {
    float* s = scores + r * n;
    const float mx = *std::max_element(s, s + n);
    const __m256 m = _mm256_set1_ps(mx);
    __m256 acc = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), m));
      _mm256_storeu_ps(s + j, e);
      acc = _mm256_add_ps(acc, e);
    }
    float sum = hsum(acc);
    for (; j < n; ++j) sum += (s[j] = std::exp(s[j] - mx));
    const float inv = 1.f / sum;
    for (j = 0; j < n; ++j) s[j] *= inv;
  }
  for (int64_t j0 = 0; j0 < n; j0 += kValueChunk) {  // 16 dimensions at a time over each chunk of values
    const int64_t j1 = std::min(n, j0 + kValueChunk);
    int64_t d = 0;
    for (; d + 16 <= Dh; d += 16) values_rows<R, 2>(scores, vc, rows, n, j0, j1, Dh, d, o, j0 > 0, d == 0);
    if (d < Dh) values_rows<R, 1>(scores, vc, rows, n, j0, j1, Dh, d, o, j0 > 0, d == 0);
  }
}

// `attend_group_scalar` with AVX2: the group's query rows four at a time.
template <typename Act>
AVX2_FN void attend_group_avx2(const float* q, const Act* kc, const Act* vc, const int64_t* rows, int64_t n,
                               int64_t group, int64_t Dh, float scale, float* scores, float* o) {
  int64_t r = 0;
  for (; r + 4 <= group; r += 4) attend_rows_avx2<4>(q + r * Dh, kc, vc, rows, n, Dh, scale, scores, o + r * Dh);
  switch (group - r) {
    case 3: attend_rows_avx2<3>(q + r * Dh, kc, vc, rows, n, Dh, scale, scores, o + r * Dh); break;
    case 2: attend_rows_avx2<2>(q + r * Dh, kc, vc, rows, n, Dh, scale, scores, o + r * Dh); break;
    case 1: attend_rows_avx2<1>(q + r * Dh, kc, vc, rows, n, Dh, scale, scores, o + r * Dh); break;
    default: break;
  }
}

template <typename Act>
void attend(const float* qkv, int64_t ldqkv, const Act* kc, const Act* vc, const int64_t* tables,
            const int64_t* ctx_lens, const Dims& d, float* out, bool simd) {
  const int64_t group = d.H / d.KVH;
  const float scale = 1.f / std::sqrt(static_cast<float>(d.Dh));
  const int64_t longest = *std::max_element(ctx_lens, ctx_lens + d.T);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, longest * d.Dh * group));
  simd = simd && d.Dh % 8 == 0;
  at::parallel_for(0, d.T * d.KVH, grain, [&](int64_t p0, int64_t p1) {
    std::vector<float> scores(group * longest);  // [group, context]
    std::vector<int64_t> rows(longest);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t t = p / d.KVH, g = p % d.KVH;
      const int64_t ctx = ctx_lens[t];
      const int64_t lo = d.sliding_window > 0 ? std::max<int64_t>(0, ctx - d.sliding_window) : 0;
      const int64_t n = ctx - lo;
      for (int64_t j = 0; j < n; ++j) {  // element offset of key / value lo + j of token t, KV head g
        const int64_t pos = lo + j;
        const int64_t slot = tables[t * d.table_width + pos / d.block_size] * d.block_size + pos % d.block_size;
        rows[j] = (slot * d.KVH + g) * d.Dh;
      }
      const float* q = qkv + t * ldqkv + g * group * d.Dh;  // the group's query heads, one after another
      float* o = out + t * d.H * d.Dh + g * group * d.Dh;
      if (simd)
        attend_group_avx2(q, kc, vc, rows.data(), n, group, d.Dh, scale, scores.data(), o);
      else
        attend_group_scalar(q, kc, vc, rows.data(), n, group, d.Dh, scale, scores.data(), o);
      round_all<Act>(o, group * d.Dh, simd);
    }
  });
}

// The projections' weights: 16-bit of the activation dtype (no scales), or int8 with per-row scales.
template <typename W>
struct Projections {
  const W* qkv;
  const W* o;
  const float* s_qkv;  // [(H + 2 KVH) Dh] or null
  const float* s_o;    // [D] or null
};

template <typename Act, typename W>
void run(const at::Tensor& x, const Projections<W>& w, const at::Tensor& cos, const at::Tensor& sin,
         at::Tensor& k_cache, at::Tensor& v_cache, const int64_t* slots, const int64_t* tables,
         const int64_t* ctx_lens, const Dims& d, float* out, bool simd) {
  const int64_t nq = d.H * d.Dh, nkv = d.KVH * d.Dh, ld = nq + 2 * nkv;
  std::vector<float> qkv(d.T * ld), attn(d.T * nq);
  gemm(x.data_ptr<float>(), d.D, w.qkv, d.D, qkv.data(), ld, d.T, ld, d.D, simd);
  scale_columns(qkv.data(), d.T, ld, w.s_qkv);
  round_all<Act>(qkv.data(), d.T * ld, simd);
  Act* kc = k_cache.data_ptr<Act>();
  Act* vc = v_cache.data_ptr<Act>();
  for (int64_t t = 0; t < d.T; ++t) {
    float* row = qkv.data() + t * ld;
    const Act* c = cos.data_ptr<Act>() + t * d.Dh;
    const Act* s = sin.data_ptr<Act>() + t * d.Dh;
    for (int64_t h = 0; h < d.H + d.KVH; ++h) rope(row + h * d.Dh, c, s, d.Dh, simd);  // q heads, then k heads
    for (int64_t i = 0; i < nkv; ++i) {  // the values are already rounded: exact
      kc[slots[t] * nkv + i] = Act(row[nq + i]);
      vc[slots[t] * nkv + i] = Act(row[nq + nkv + i]);
    }
  }
  attend(qkv.data(), ld, kc, vc, tables, ctx_lens, d, attn.data(), simd);
  gemm(attn.data(), nq, w.o, nq, out, d.D, d.T, d.D, nq, simd);
  scale_columns(out, d.T, d.D, w.s_o);
  round_all<Act>(out, d.T * d.D, simd);
}

// The 8-bit projections' scales: both given, contiguous fp32, one per row of w_qkv and w_o; none for 16-bit.
std::pair<const float*, const float*> projection_scales(const at::Tensor& w_qkv, const at::Tensor& w_o,
                                                        const std::optional<at::Tensor>& s_qkv,
                                                        const std::optional<at::Tensor>& s_o) {
  const bool q = w_qkv.scalar_type() == at::kChar || w_qkv.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(q == s_qkv.has_value() && q == s_o.has_value(), "attention_decode: 8-bit projections need both ",
              "scales (s_qkv, s_o) and 16-bit ones take none; w_qkv ", w_qkv.scalar_type(), ", scales given: ",
              s_qkv.has_value(), ", ", s_o.has_value());
  if (!q) return {nullptr, nullptr};
  for (const auto& [s, w] : {std::pair{&*s_qkv, &w_qkv}, std::pair{&*s_o, &w_o}})
    TORCH_CHECK(s->scalar_type() == at::kFloat && s->is_contiguous() && s->dim() == 1 && s->size(0) == w->size(0),
                "attention_decode: scales must be contiguous float32 [", w->size(0), "], got ", s->scalar_type(),
                " ", s->sizes());
  return {s_qkv->data_ptr<float>(), s_o->data_ptr<float>()};
}

}  // namespace

// See kernels/cpu/__init__.py `attention_decode`.
at::Tensor attention_decode(const at::Tensor& x_in, const at::Tensor& w_qkv, const at::Tensor& w_o,
                            const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                            const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, int64_t n_heads, int64_t n_kv_heads,
                            int64_t sliding_window, bool simd, const std::optional<at::Tensor>& s_qkv,
                            const std::optional<at::Tensor>& s_o) {
  simd = simd && cpu_has_avx2();
  const at::ScalarType dt = x_in.scalar_type();
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf, "attention_decode: x must be bfloat16 or float16, got ", dt);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&cos, &sin, &k_cache, &v_cache})
    TORCH_CHECK(t->scalar_type() == dt && t->is_contiguous(),
                "attention_decode: cos/sin and caches must be contiguous ", dt, ", got ", t->scalar_type());
  const at::ScalarType wt = w_qkv.scalar_type();
  TORCH_CHECK((wt == dt || wt == at::kChar || wt == at::kFloat8_e4m3fn) && w_o.scalar_type() == wt &&
                  w_qkv.is_contiguous() && w_o.is_contiguous(),
              "attention_decode: w_qkv and w_o must be contiguous, both ", dt, ", both int8 or both float8_e4m3fn, ",
              "got ", wt, " and ", w_o.scalar_type());
  const auto [sq, so] = projection_scales(w_qkv, w_o, s_qkv, s_o);
  TORCH_CHECK(x_in.dim() == 2 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "attention_decode: x [T, D] and caches [num_blocks, block_size, KVH, Dh] expected, got ",
              x_in.sizes(), ", ", k_cache.sizes(), ", ", v_cache.sizes());
  Dims d{x_in.size(0), x_in.size(1), n_heads, n_kv_heads, k_cache.size(3), k_cache.size(1), block_tables.size(1),
         sliding_window};
  TORCH_CHECK(d.KVH == k_cache.size(2) && d.KVH > 0 && d.H % d.KVH == 0 && d.Dh % 2 == 0,
              "attention_decode: ", d.H, " query heads over ", d.KVH, " KV heads of even size expected, cache ",
              k_cache.sizes());
  TORCH_CHECK(w_qkv.dim() == 2 && w_qkv.size(0) == (d.H + 2 * d.KVH) * d.Dh && w_qkv.size(1) == d.D,
              "attention_decode: w_qkv must be [(H + 2 KVH) Dh, D] = [", (d.H + 2 * d.KVH) * d.Dh, ", ", d.D,
              "], got ", w_qkv.sizes());
  TORCH_CHECK(w_o.dim() == 2 && w_o.size(0) == d.D && w_o.size(1) == d.H * d.Dh, "attention_decode: w_o must be [",
              d.D, ", ", d.H * d.Dh, "], got ", w_o.sizes());
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.size(0) == d.T && cos.size(1) == d.Dh,
              "attention_decode: cos and sin must be [T, Dh] = [", d.T, ", ", d.Dh, "], got ", cos.sizes());
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  const at::Tensor tables = block_tables.to(at::kLong).contiguous();
  const at::Tensor ctx = context_lens.to(at::kLong).contiguous();
  TORCH_CHECK(slots.numel() == d.T && ctx.numel() == d.T && tables.dim() == 2 && tables.size(0) == d.T,
              "attention_decode: one slot, one block table row and one context length per token expected, got ",
              slots.sizes(), ", ", tables.sizes(), ", ", ctx.sizes(), " for T = ", d.T);
  const int64_t num_blocks = k_cache.size(0);
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* cp = ctx.data_ptr<int64_t>();
  for (int64_t t = 0; t < d.T; ++t) {
    TORCH_CHECK(cp[t] >= 1 && cp[t] <= d.table_width * d.block_size, "attention_decode: context length ", cp[t],
                " of token ", t, " outside [1, ", d.table_width * d.block_size, "]");
    TORCH_CHECK(sp[t] >= 0 && sp[t] < num_blocks * d.block_size, "attention_decode: slot ", sp[t], " of token ", t,
                " outside the cache's ", num_blocks * d.block_size, " slots");
    for (int64_t b = 0; b < (cp[t] + d.block_size - 1) / d.block_size; ++b)
      TORCH_CHECK(tp[t * d.table_width + b] >= 0 && tp[t * d.table_width + b] < num_blocks, "attention_decode: block ",
                  tp[t * d.table_width + b], " of token ", t, " outside [0, ", num_blocks, ")");
  }
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({d.T, d.D}, x.options());
  auto go = [&](auto act) {
    using Act = decltype(act);
    if (wt == at::kChar)
      run<Act>(x, Projections<int8_t>{w_qkv.data_ptr<int8_t>(), w_o.data_ptr<int8_t>(), sq, so}, cos, sin, k_cache,
               v_cache, sp, tp, cp, d, out.data_ptr<float>(), simd);
    else if (wt == at::kFloat8_e4m3fn)
      run<Act>(x, Projections<c10::Float8_e4m3fn>{w_qkv.data_ptr<c10::Float8_e4m3fn>(),
                                                  w_o.data_ptr<c10::Float8_e4m3fn>(), sq, so},
               cos, sin, k_cache, v_cache, sp, tp, cp, d, out.data_ptr<float>(), simd);
    else
      run<Act>(x, Projections<Act>{w_qkv.data_ptr<Act>(), w_o.data_ptr<Act>(), nullptr, nullptr}, cos, sin,
               k_cache, v_cache, sp, tp, cp, d, out.data_ptr<float>(), simd);
  };
  if (dt == at::kBFloat16)
    go(c10::BFloat16{});
  else
    go(c10::Half{});
  return out.to(dt);
}

}  // namespace moe_cpu
