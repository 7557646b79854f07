// AVX-512 task kernel of block-sparse attention (see attn_kernel.h). Every function here carries
// target("avx512f,fma") so the file builds on a plain x86-64 baseline; the driver calls it only after
// __builtin_cpu_supports("avx512f"). No STL in here: nothing AVX-512-compiled can leak into shared
// inline functions used by baseline code.
#include <cmath>

#include "cpu/attn_kernel.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define AS_HAVE_AVX512_CODE 1
#define AS_AVX512 __attribute__((target("avx512f,fma")))
#define AS_AVX512_INLINE __attribute__((target("avx512f,fma"), always_inline)) inline
#endif

namespace autosculpt {

bool cpu_has_avx512f() {
#ifdef AS_HAVE_AVX512_CODE
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

bool attn_avx512_supported_shape(const AttnDims& dims) {
  return dims.bs % 16 == 0 && dims.bs <= 256 && dims.dp % 16 == 0 && dims.dp <= 256;
}

#ifdef AS_HAVE_AVX512_CODE
namespace {

// 2^x for x <= 0 (softmax in the exp2 domain). 2^x = 2^n * 2^f with n = round(x), |f| <= 1/2 and a
// degree-7 Taylor polynomial of e^(f ln 2) (relative error < 1e-8, below fp32 rounding). Inputs below
// -127 (including -inf from masked columns) give exactly 0.
AS_AVX512_INLINE __m512 exp2_ps(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-127.0f);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
  x = _mm512_max_ps(x, lo);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.525273380405984e-05f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381606e-04f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265069591007e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471805599453e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(keep, p, n);
}

// s[r][c] = sum_k qs[r][k] * kt[k][c] for an R x (16*NC) tile; accumulators stay in registers.
template <int R, int NC>
AS_AVX512_INLINE void qk_tile(const float* qs, int64_t dp, const float* kt, int64_t bs, int64_t d, float* s) {
  __m512 acc[R][NC];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < d; ++k) {
    const float* kr = kt + k * bs;
    __m512 b[NC];
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) b[c] = _mm512_loadu_ps(kr + 16 * c);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(qs[r * dp + k]);
#pragma GCC unroll 4
      for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_fmadd_ps(a, b[c], acc[r][c]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(s + r * bs + 16 * c, acc[r][c]);
}

// o[r][:] = o[r][:] * alpha[r] + sum_j p[r][j] * vp[j][:] for an R x (16*NV) tile.
template <int R, int NV>
AS_AVX512_INLINE void pv_tile(const float* p, int64_t bs, int64_t nj, const float* vp, int64_t dp,
                              const float* alpha, float* o) {
  __m512 acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const __m512 al = _mm512_set1_ps(alpha[r]);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_mul_ps(_mm512_loadu_ps(o + r * dp + 16 * v), al);
  }
  for (int64_t j = 0; j < nj; ++j) {
    const float* vr = vp + j * dp;
    __m512 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(vr + 16 * v);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(p[r * bs + j]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(a, b[v], acc[r][v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(o + r * dp + 16 * v, acc[r][v]);
}

template <int R, int NC>
AS_AVX512_INLINE void qk_block(const float* qs, int64_t rows, int64_t dp, const float* kt, int64_t bs, int64_t d,
                               float* s) {
  for (int64_t r0 = 0; r0 < rows; r0 += R)
    for (int64_t c0 = 0; c0 < bs; c0 += 16 * NC) qk_tile<R, NC>(qs + r0 * dp, dp, kt + c0, bs, d, s + r0 * bs + c0);
}

template <int R, int NV>
AS_AVX512_INLINE void pv_block(const float* p, int64_t rows, int64_t bs, int64_t nj, const float* vp, int64_t dp,
                               const float* alpha, float* o) {
  for (int64_t r0 = 0; r0 < rows; r0 += R)
    for (int64_t c0 = 0; c0 < dp; c0 += 16 * NV)
      pv_tile<R, NV>(p + r0 * bs, bs, nj, vp + c0, dp, alpha + r0, o + r0 * dp + c0);
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

}  // namespace

AS_AVX512 void attn_task_avx512(const AttnDims& dims, const AttnTask& t, const AttnScratch& sc) {
  const int64_t bs = dims.bs, d = dims.d, dp = dims.dp, nq = t.nq;
  const int64_t nvec_d = dp / 16;
  const __mmask16 dtail = (d % 16) ? __mmask16((1u << (d % 16)) - 1u) : __mmask16(0xFFFF);
  if (t.nk == 0) {  // no kept key block: the rows attend to nothing and output zeros
    for (int64_t r = 0; r < nq; ++r)
      for (int64_t c = 0; c < d; ++c) t.out[r * d + c] = 0.0f;
    return;
  }
  // Row tiles: QK^T uses R_QK rows, P.V uses R_PV rows; both divide bs and R_PV divides R_QK, so the
  // rows computed by the softmax cover the rows P.V reads.
  const bool qk32 = (bs % 32 == 0);
  const int64_t r_qk = qk32 ? 8 : 16;
  int pv_kind;  // (rows, vectors): 0 = (4,4), 1 = (4,3), 2 = (8,2), 3 = (8,1)
  if (nvec_d % 4 == 0) pv_kind = 0;
  else if (nvec_d == 3) pv_kind = 1;
  else if (nvec_d % 2 == 0) pv_kind = 2;
  else pv_kind = 3;
  const int64_t r_pv = pv_kind <= 1 ? 4 : 8;
  const int64_t rows_qk = round_up(nq, r_qk) < bs ? round_up(nq, r_qk) : bs;
  const int64_t rows_pv = round_up(nq, r_pv) < bs ? round_up(nq, r_pv) : bs;

  // Scaled, zero-padded query block; zeroed accumulator; running max and sum.
  const __m512 qscale = _mm512_set1_ps(dims.qscale);
  for (int64_t r = 0; r < rows_qk; ++r) {
    for (int64_t v = 0; v < nvec_d; ++v) {
      __m512 x = _mm512_setzero_ps();
      if (r < nq) {
        const __mmask16 msk = (v == nvec_d - 1) ? dtail : __mmask16(0xFFFF);
        x = _mm512_mul_ps(_mm512_maskz_loadu_ps(msk, t.q + r * d + 16 * v), qscale);
      }
      _mm512_storeu_ps(sc.qs + r * dp + 16 * v, x);
      _mm512_storeu_ps(sc.o + r * dp + 16 * v, _mm512_setzero_ps());
    }
    sc.m[r] = -INFINITY;
    sc.l[r] = 0.0f;
  }

  for (int64_t ki = 0; ki < t.nk; ++ki) {
    const int64_t kb = t.kblocks[ki];
    const float* kt = t.kt + kb * d * bs;
    const float* vp = t.vp + kb * bs * dp;
    if (qk32) qk_block<8, 2>(sc.qs, rows_qk, dp, kt, bs, d, sc.s);
    else qk_block<16, 1>(sc.qs, rows_qk, dp, kt, bs, d, sc.s);
    const int64_t valid = (kb == t.tail_kb) ? t.tail_valid : bs;
    const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
    // Online softmax over this block's columns, row by row.
    for (int64_t r = 0; r < rows_qk; ++r) {
      float* srow = sc.s + r * bs;
      if (valid < bs) {
        for (int64_t c = valid; c < bs; ++c) srow[c] = -INFINITY;
      }
      __m512 vmax = neg_inf;
      for (int64_t c = 0; c < bs; c += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(srow + c));
      const float m_old = sc.m[r];
      const float mx = _mm512_reduce_max_ps(vmax);
      const float m_new = mx > m_old ? mx : m_old;
      const __m512 mv = _mm512_set1_ps(m_new);
      __m512 vsum = _mm512_setzero_ps();
      for (int64_t c = 0; c < bs; c += 16) {
        const __m512 p = exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(srow + c), mv));
        _mm512_storeu_ps(srow + c, p);
        vsum = _mm512_add_ps(vsum, p);
      }
      const float alpha = std::exp2(m_old - m_new);  // m_old = -inf on the first block: alpha = 0
      sc.alpha[r] = alpha;
      sc.l[r] = sc.l[r] * alpha + _mm512_reduce_add_ps(vsum);
      sc.m[r] = m_new;
    }
    switch (pv_kind) {
      case 0: pv_block<4, 4>(sc.s, rows_pv, bs, valid, vp, dp, sc.alpha, sc.o); break;
      case 1: pv_block<4, 3>(sc.s, rows_pv, bs, valid, vp, dp, sc.alpha, sc.o); break;
      case 2: pv_block<8, 2>(sc.s, rows_pv, bs, valid, vp, dp, sc.alpha, sc.o); break;
      default: pv_block<8, 1>(sc.s, rows_pv, bs, valid, vp, dp, sc.alpha, sc.o); break;
    }
  }
  for (int64_t r = 0; r < nq; ++r) {
    const __m512 inv = _mm512_set1_ps(1.0f / sc.l[r]);
    for (int64_t v = 0; v < nvec_d; ++v) {
      const __mmask16 msk = (v == nvec_d - 1) ? dtail : __mmask16(0xFFFF);
      _mm512_mask_storeu_ps(t.out + r * d + 16 * v, msk, _mm512_mul_ps(_mm512_loadu_ps(sc.o + r * dp + 16 * v), inv));
    }
  }
}
#else
void attn_task_avx512(const AttnDims&, const AttnTask&, const AttnScratch&) {}
#endif

}  // namespace autosculpt
