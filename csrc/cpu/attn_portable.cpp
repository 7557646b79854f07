// Portable task kernel of block-sparse attention (no intrinsics): the transposed formulation of
// attn_avx512.cpp written with GCC/Clang vector extensions of the target's native width (4 or 8
// floats), in tiles of 8 accumulator vectors that stay in registers. The body is
// always_inline into two entry points: a target("avx2,fma") one chosen at run time on x86 CPUs that
// have them, and a baseline one (SSE2 on x86; NEON etc. elsewhere). Used for block sizes 16/32/64/128
// when AVX-512 is absent; other block sizes use the simple loops in block_attention.cpp.
#if defined(__GNUC__) && !defined(__clang__)
// a*b+c contracted to FMA where the target has it (ISO C++ mode turns contraction off by default)
#pragma GCC optimize("fp-contract=fast")
#endif
#if defined(__GNUC__)
// Vector types are passed only between always_inline functions, so the "ABI changes" note is moot.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#include <cmath>
#include <cstring>

#include "cpu/attn_kernel.h"
#include "cpu/cpu_features.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define AS_HAVE_AVX2_CLONE 1
#endif
#define AS_INLINE __attribute__((always_inline)) inline

namespace autosculpt {

namespace {

// Native vector types: W floats (4 = SSE/NEON, 8 = AVX2). A 16-query-row lane group is NV = 16 / W
// native vectors, and tiles hold 8 accumulator vectors (R = 8 / NV rows), which fit the 16 registers.
template <int W>
struct V;
template <>
struct V<4> {
  typedef float f __attribute__((vector_size(16)));
  typedef int32_t i __attribute__((vector_size(16)));
};
template <>
struct V<8> {
  typedef float f __attribute__((vector_size(32)));
  typedef int32_t i __attribute__((vector_size(32)));
};
constexpr int kLanes = 16;  // query rows per lane group

template <int W>
AS_INLINE typename V<W>::f load(const float* p) {
  typename V<W>::f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <int W>
AS_INLINE void store(float* p, typename V<W>::f v) {
  std::memcpy(p, &v, sizeof(v));
}
template <int W>
AS_INLINE typename V<W>::f splat(float x) {
  return typename V<W>::f{} + x;
}

// 2^x for x <= 0 (see exp2_ps in attn_avx512.cpp): 2^n from exponent bits times a degree-7 polynomial
// of 2^f; x < -126 (and -inf) gives exactly 0, NaN gives NaN (it must reach the output, as in SDPA).
template <int W>
AS_INLINE typename V<W>::f exp2_vec(typename V<W>::f x) {
  using vf = typename V<W>::f;
  using vi = typename V<W>::i;
  const vf x_in = x;
  const vi tiny = x < -126.0f;
  const vi nan = x != x;
  x = (tiny | nan) ? splat<W>(-126.0f) : x;
  const vi n = __builtin_convertvector(x - 0.5f, vi);  // truncation toward 0 = round for x in [-126, 0]
  const vf f = x - __builtin_convertvector(n, vf);     // in (-0.5, 0.5]
  vf p = splat<W>(1.525273380405984e-05f);
  p = p * f + 1.5403530393381606e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.618129107628477e-03f;
  p = p * f + 5.550410866482158e-02f;
  p = p * f + 2.402265069591007e-01f;
  p = p * f + 6.931471805599453e-01f;
  p = p * f + 1.0f;
  vf scale;
  const vi bits = (n + 127) << 23;
  std::memcpy(&scale, &bits, sizeof(scale));
  return tiny ? splat<W>(0.0f) : (nan ? x_in : p * scale);
}

// st[j][16 lanes] = sum_k krow[j][k] * qt[k][16 lanes] for R key rows.
template <int W, int R>
AS_INLINE void qk_tile(const float* const* krow, const float* qt, int64_t bs, int64_t d, float* st) {
  constexpr int NV = kLanes / W;
  typename V<W>::f acc[R][NV];
  for (int j = 0; j < R; ++j)
    for (int c = 0; c < NV; ++c) acc[j][c] = splat<W>(0.0f);
  for (int64_t k = 0; k < d; ++k) {
    typename V<W>::f b[NV];
    for (int c = 0; c < NV; ++c) b[c] = load<W>(qt + k * bs + c * W);
    for (int j = 0; j < R; ++j) {
      const float a = krow[j][k];
      for (int c = 0; c < NV; ++c) acc[j][c] += a * b[c];
    }
  }
  for (int j = 0; j < R; ++j)
    for (int c = 0; c < NV; ++c) store<W>(st + j * bs + c * W, acc[j][c]);
}

// ot[e][16 lanes] = ot[e][lanes] * alpha + sum_{j < nj} v[j][e] * pt[j][lanes] for R head-dim rows.
template <int W, int R>
AS_INLINE void pv_tile(const float* v, int64_t d, int64_t nj, const float* pt, int64_t bs, const float* alpha,
                       float* ot) {
  constexpr int NV = kLanes / W;
  typename V<W>::f acc[R][NV];
  for (int c = 0; c < NV; ++c) {
    const typename V<W>::f al = load<W>(alpha + c * W);
    for (int e = 0; e < R; ++e) acc[e][c] = load<W>(ot + e * bs + c * W) * al;
  }
  for (int64_t j = 0; j < nj; ++j) {
    typename V<W>::f b[NV];
    for (int c = 0; c < NV; ++c) b[c] = load<W>(pt + j * bs + c * W);
    const float* vr = v + j * d;
    for (int e = 0; e < R; ++e) {
      const float a = vr[e];
      for (int c = 0; c < NV; ++c) acc[e][c] += a * b[c];
    }
  }
  for (int e = 0; e < R; ++e)
    for (int c = 0; c < NV; ++c) store<W>(ot + e * bs + c * W, acc[e][c]);
}

template <int W>
AS_INLINE void portable_task(const AttnDims& dims, const AttnTask& t, const AttnScratch& sc) {
  using vf = typename V<W>::f;
  constexpr int R = 8 / (kLanes / W);  // 8 accumulator vectors per tile
  const int64_t bs = dims.bs, d = dims.d, nq = t.nq;
  if (t.nk == 0) {
    for (int64_t i = 0; i < nq * d; ++i) t.out[i] = 0.0f;
    return;
  }
  // Qt [d][bs] (scaled, zero past nq); O^T [d][bs] = 0; m = -inf; l = 0.
  for (int64_t e = 0; e < d; ++e)
    for (int64_t i = 0; i < bs; ++i) sc.qs[e * bs + i] = i < nq ? t.q[i * d + e] * dims.qscale : 0.0f;
  for (int64_t i = 0; i < d * bs; ++i) sc.o[i] = 0.0f;
  for (int64_t i = 0; i < bs; ++i) {
    sc.m[i] = -INFINITY;
    sc.l[i] = 0.0f;
  }
  for (int64_t ki = 0; ki < t.nk; ++ki) {
    const int64_t kb = t.kblocks[ki];
    const float* kblk = t.k + kb * bs * d;
    const float* vblk = t.v + kb * bs * d;
    const int64_t valid = (kb == t.tail_kb) ? t.tail_valid : bs;
    for (int64_t j0 = 0; j0 < valid; j0 += R) {
      const float* krow[R];
      for (int j = 0; j < R; ++j) krow[j] = (j0 + j < valid) ? kblk + (j0 + j) * d : sc.zeros;
      for (int64_t i0 = 0; i0 < bs; i0 += kLanes) qk_tile<W, R>(krow, sc.qs + i0, bs, d, sc.s + j0 * bs + i0);
    }
    for (int64_t i0 = 0; i0 < bs; i0 += W) {
      const vf m_old = load<W>(sc.m + i0);
      vf m_new = m_old;
      for (int64_t j = 0; j < valid; ++j) {
        const vf x = load<W>(sc.s + j * bs + i0);
        m_new = x > m_new ? x : m_new;
      }
      // While every score so far is -inf, subtract 0 instead (-inf - -inf would be NaN): p = alpha = 0.
      const vf m_sub = (m_new == -INFINITY) ? splat<W>(0.0f) : m_new;
      vf sum = splat<W>(0.0f);
      for (int64_t j = 0; j < valid; ++j) {
        const vf p = exp2_vec<W>(load<W>(sc.s + j * bs + i0) - m_sub);
        store<W>(sc.s + j * bs + i0, p);
        sum += p;
      }
      const vf alpha = exp2_vec<W>(m_old - m_sub);  // m_old = -inf on the first block: 0
      store<W>(sc.alpha + i0, alpha);
      store<W>(sc.l + i0, load<W>(sc.l + i0) * alpha + sum);
      store<W>(sc.m + i0, m_new);
    }
    for (int64_t i0 = 0; i0 < bs; i0 += kLanes) {
      int64_t e0 = 0;
      for (; e0 + R <= d; e0 += R)
        pv_tile<W, R>(vblk + e0, d, valid, sc.s + i0, bs, sc.alpha + i0, sc.o + e0 * bs + i0);
      for (; e0 < d; ++e0) pv_tile<W, 1>(vblk + e0, d, valid, sc.s + i0, bs, sc.alpha + i0, sc.o + e0 * bs + i0);
    }
  }
  for (int64_t i = 0; i < nq; ++i) {
    const float inv = 1.0f / sc.l[i];
    for (int64_t e = 0; e < d; ++e) t.out[i * d + e] = sc.o[e * bs + i] * inv;
  }
}

}  // namespace

void attn_task_portable(const AttnDims& dims, const AttnTask& t, const AttnScratch& sc) { portable_task<4>(dims, t, sc); }

#ifdef AS_HAVE_AVX2_CLONE
__attribute__((target("avx2,fma"))) void attn_task_portable_avx2(const AttnDims& dims, const AttnTask& t,
                                                                 const AttnScratch& sc) {
  portable_task<8>(dims, t, sc);
}
bool cpu_has_avx2_fma() { return cpu_features().avx2_fma; }
#else
void attn_task_portable_avx2(const AttnDims& dims, const AttnTask& t, const AttnScratch& sc) {
  portable_task<4>(dims, t, sc);
}
bool cpu_has_avx2_fma() { return false; }
#endif

}  // namespace autosculpt
