// AVX-512 task kernel of block-sparse attention (see attn_kernel.h). Every function here carries
// target("avx512f,fma") so the file builds on a plain x86-64 baseline; the driver calls it only after
// cpu_features().avx512f. No STL in here: nothing AVX-512-compiled can leak into shared
// inline functions used by baseline code.
//
// Transposed formulation, vectorised over the 16 query rows of a lane group:
//   Qt  = scale*log2(e) * Q_blk^T          [d][bs]   packed once per task (the only copy)
//   S^T = K_blk Qt                          [bs][bs]  K rows broadcast straight from the input
//   m, l, alpha per query lane: column max / sums of S^T are plain vertical vector ops
//   O^T = O^T * alpha + V_blk^T P^T         [dp][bs]  V entries broadcast straight from the input
//   out = (O^T / l)^T                       16x16 register transposes on the way out
// so no K/V packing pass and no horizontal reductions are needed.
#include <cmath>

#include "cpu/attn_kernel.h"
#include "cpu/cpu_features.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define AS_HAVE_AVX512_CODE 1
#define AS_AVX512 __attribute__((target("avx512f,fma")))
#define AS_AVX512_INLINE __attribute__((target("avx512f,fma"), always_inline)) inline
#endif

namespace autosculpt {

bool cpu_has_avx512f() {
#ifdef AS_HAVE_AVX512_CODE
  return cpu_features().avx512f;
#else
  return false;
#endif
}

bool attn_avx512_supported_shape(const AttnDims& dims) {
  const bool bs_ok = dims.bs == 16 || dims.bs == 32 || dims.bs == 64 || dims.bs == 128;
  return bs_ok && dims.dp % 16 == 0 && dims.dp <= 256;
}

#ifdef AS_HAVE_AVX512_CODE
namespace {

// 2^x for x <= 0 (softmax in the exp2 domain). 2^x = 2^n * 2^f with n = round(x), |f| <= 1/2 and a
// degree-7 Taylor polynomial of e^(f ln 2) (relative error < 1e-8, below fp32 rounding). Inputs below
// -127 (including -inf) give exactly 0; NaN gives NaN (a NaN score must reach the output, as in SDPA).
AS_AVX512_INLINE __m512 exp2_ps(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-127.0f);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ);  // x >= lo, or NaN
  x = _mm512_max_ps(lo, x);  // max_ps returns its second operand when either is NaN
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

// In-register 16x16 transpose: r[i] lane j  ->  r[j] lane i.
AS_AVX512_INLINE void transpose16(__m512 r[16]) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
}

// S^T rows j0..j0+J of one key block: st[j][i] = sum_k krow[j][k] * qt[k][i], i over 16*NI lanes.
template <int J, int NI>
AS_AVX512_INLINE void qk_tile(const float* const* krow, const float* qt, int64_t d, float* st) {
  constexpr int64_t bs = 16 * NI;
  __m512 acc[J][NI];
#pragma GCC unroll 16
  for (int j = 0; j < J; ++j)
#pragma GCC unroll 8
    for (int c = 0; c < NI; ++c) acc[j][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < d; ++k) {
    __m512 b[NI];
#pragma GCC unroll 8
    for (int c = 0; c < NI; ++c) b[c] = _mm512_loadu_ps(qt + k * bs + 16 * c);
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j) {
      const __m512 a = _mm512_set1_ps(krow[j][k]);
#pragma GCC unroll 8
      for (int c = 0; c < NI; ++c) acc[j][c] = _mm512_fmadd_ps(a, b[c], acc[j][c]);
    }
  }
#pragma GCC unroll 16
  for (int j = 0; j < J; ++j)
#pragma GCC unroll 8
    for (int c = 0; c < NI; ++c) _mm512_storeu_ps(st + j * bs + 16 * c, acc[j][c]);
}

// O^T rows d0..d0+DD: ot[e][i] = ot[e][i] * alpha[i] + sum_{j < nj} v[j][d0 + e] * pt[j][i].
template <int DD, int NI>
AS_AVX512_INLINE void pv_tile(const float* v, int64_t d, int64_t nj, const float* pt, const float* alpha,
                              float* ot) {
  constexpr int64_t bs = 16 * NI;
  __m512 acc[DD][NI];
#pragma GCC unroll 8
  for (int c = 0; c < NI; ++c) {
    const __m512 al = _mm512_loadu_ps(alpha + 16 * c);
#pragma GCC unroll 16
    for (int e = 0; e < DD; ++e) acc[e][c] = _mm512_mul_ps(_mm512_loadu_ps(ot + e * bs + 16 * c), al);
  }
  for (int64_t j = 0; j < nj; ++j) {
    __m512 b[NI];
#pragma GCC unroll 8
    for (int c = 0; c < NI; ++c) b[c] = _mm512_loadu_ps(pt + j * bs + 16 * c);
    const float* vr = v + j * d;
#pragma GCC unroll 16
    for (int e = 0; e < DD; ++e) {
      const __m512 a = _mm512_set1_ps(vr[e]);
#pragma GCC unroll 8
      for (int c = 0; c < NI; ++c) acc[e][c] = _mm512_fmadd_ps(a, b[c], acc[e][c]);
    }
  }
#pragma GCC unroll 16
  for (int e = 0; e < DD; ++e)
#pragma GCC unroll 8
    for (int c = 0; c < NI; ++c) _mm512_storeu_ps(ot + e * bs + 16 * c, acc[e][c]);
}

// One key block: S^T, online softmax down the columns, O^T update. J*NI = DD*NI = 16 accumulators.
template <int NI>
AS_AVX512_INLINE void attend_block(const AttnDims& dims, const float* kblk, const float* vblk, int64_t valid,
                                   int64_t nlanes, const AttnScratch& sc) {
  constexpr int64_t bs = 16 * NI;
  constexpr int J = 16 / NI;
  const int64_t d = dims.d;
  // S^T = K Qt over the valid key rows (rows past Lk would read outside K: they use a zero row, and
  // the softmax below never reads them).
  for (int64_t j0 = 0; j0 < valid; j0 += J) {
    const float* krow[J];
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j) krow[j] = (j0 + j < valid) ? kblk + (j0 + j) * d : sc.zeros;
    qk_tile<J, NI>(krow, sc.qs, d, sc.s + j0 * bs);
  }
  // Online softmax per query lane, over the valid key rows only.
  for (int64_t c = 0; c < nlanes; ++c) {
    const __m512 m_old = _mm512_loadu_ps(sc.m + 16 * c);
    __m512 m_new = m_old;
    for (int64_t j = 0; j < valid; ++j) m_new = _mm512_max_ps(m_new, _mm512_loadu_ps(sc.s + j * bs + 16 * c));
    // While every score so far is -inf, subtract 0 instead (-inf - -inf would be NaN): p = alpha = 0.
    const __m512 m_sub = _mm512_mask_mov_ps(
        m_new, _mm512_cmp_ps_mask(m_new, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ), _mm512_setzero_ps());
    const __m512 alpha = exp2_ps(_mm512_sub_ps(m_old, m_sub));  // m_old = -inf on the first block: 0
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < valid; ++j) {
      const __m512 p = exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(sc.s + j * bs + 16 * c), m_sub));
      _mm512_storeu_ps(sc.s + j * bs + 16 * c, p);
      sum = _mm512_add_ps(sum, p);
    }
    _mm512_storeu_ps(sc.m + 16 * c, m_new);
    _mm512_storeu_ps(sc.alpha + 16 * c, alpha);
    _mm512_storeu_ps(sc.l + 16 * c, _mm512_fmadd_ps(_mm512_loadu_ps(sc.l + 16 * c), alpha, sum));
  }
  // O^T = O^T * alpha + V^T P^T, DD head-dim rows at a time (then the remainder one by one).
  constexpr int DD = 16 / NI;
  int64_t e0 = 0;
  for (; e0 + DD <= d; e0 += DD) pv_tile<DD, NI>(vblk + e0, d, valid, sc.s, sc.alpha, sc.o + e0 * bs);
  for (; e0 < d; ++e0) pv_tile<1, NI>(vblk + e0, d, valid, sc.s, sc.alpha, sc.o + e0 * bs);
}

template <int NI>
AS_AVX512_INLINE void run_task(const AttnDims& dims, const AttnTask& t, const AttnScratch& sc) {
  constexpr int64_t bs = 16 * NI;
  const int64_t d = dims.d, dp = dims.dp, nq = t.nq;
  // Rows past nq are zero queries: finite, computed with the rest of their lane, never stored.
  const __m512 qscale = _mm512_set1_ps(dims.qscale);
  // Qt [d][bs] = qscale * Q^T via 16x16 transposes; O^T [dp][bs] = 0; m = -inf; l = 0.
  for (int64_t c = 0; c < NI; ++c) {
    for (int64_t e0 = 0; e0 < dp; e0 += 16) {
      const int64_t ne = d - e0 < 16 ? d - e0 : 16;
      const __mmask16 emask = ne >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << ne) - 1u);
      __m512 r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        const int64_t row = 16 * c + i;
        r[i] = row < nq ? _mm512_mul_ps(_mm512_maskz_loadu_ps(emask, t.q + row * d + e0), qscale) : _mm512_setzero_ps();
      }
      transpose16(r);
      for (int64_t e = 0; e < ne; ++e) _mm512_storeu_ps(sc.qs + (e0 + e) * bs + 16 * c, r[e]);
    }
    _mm512_storeu_ps(sc.m + 16 * c, _mm512_set1_ps(-INFINITY));
    _mm512_storeu_ps(sc.l + 16 * c, _mm512_setzero_ps());
  }
  for (int64_t i = 0; i < dp * bs; i += 16) _mm512_storeu_ps(sc.o + i, _mm512_setzero_ps());

  for (int64_t ki = 0; ki < t.nk; ++ki) {
    const int64_t kb = t.kblocks[ki];
    const int64_t valid = (kb == t.tail_kb) ? t.tail_valid : bs;
    attend_block<NI>(dims, t.k + kb * bs * d, t.v + kb * bs * d, valid, NI, sc);
  }

  // out[i][e] = O^T[e][i] / l[i], transposed back 16x16 at a time.
  for (int64_t c = 0; c < NI; ++c) {
    if (16 * c >= nq) break;
    const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_loadu_ps(sc.l + 16 * c));
    for (int64_t e0 = 0; e0 < dp; e0 += 16) {
      const int64_t ne = d - e0 < 16 ? d - e0 : 16;
      const __mmask16 emask = ne >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << ne) - 1u);
      __m512 r[16];
#pragma GCC unroll 16
      for (int e = 0; e < 16; ++e) r[e] = _mm512_mul_ps(_mm512_loadu_ps(sc.o + (e0 + e) * bs + 16 * c), inv);
      transpose16(r);
      for (int64_t i = 0; i < 16 && 16 * c + i < nq; ++i)
        _mm512_mask_storeu_ps(t.out + (16 * c + i) * d + e0, emask, r[i]);
    }
  }
}

}  // namespace

AS_AVX512 void attn_task_avx512(const AttnDims& dims, const AttnTask& t, const AttnScratch& sc) {
  if (t.nk == 0) {  // no kept key block: the rows attend to nothing and output zeros
    for (int64_t i = 0; i < t.nq * dims.d; ++i) t.out[i] = 0.0f;
    return;
  }
  switch (dims.bs) {
    case 16: run_task<1>(dims, t, sc); break;
    case 32: run_task<2>(dims, t, sc); break;
    case 64: run_task<4>(dims, t, sc); break;
    default: run_task<8>(dims, t, sc); break;
  }
}
#else
void attn_task_avx512(const AttnDims&, const AttnTask&, const AttnScratch&) {}
#endif

}  // namespace autosculpt
