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
  const bool bs_ok = dims.bs == 16 || dims.bs == 32 || dims.bs == 64 || dims.bs == 128;
  return bs_ok && dims.dp % 16 == 0 && dims.dp <= 256;
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

// One R-row tile of S = Qs K^T spanning the whole key block (16*NC = bs columns), kept in registers,
// then the online-softmax update of those rows: columns >= valid are masked (-inf), the running max
// m and sum l are updated, alpha = 2^(m_old - m_new) is stored for the P.V rescale, and P = 2^(S - m)
// is written to p (row stride bs). Keeping the full row in registers avoids storing and re-reading S.
template <int R, int NC>
AS_AVX512_INLINE void qk_softmax_tile(const float* qs, int64_t dp, const float* kt, int64_t d, int64_t valid,
                                      float* p, float* m, float* l, float* alpha) {
  constexpr int64_t bs = 16 * NC;
  __m512 acc[R][NC];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < d; ++k) {
    const float* kr = kt + k * bs;
    __m512 b[NC];
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) b[c] = _mm512_loadu_ps(kr + 16 * c);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(qs[r * dp + k]);
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_fmadd_ps(a, b[c], acc[r][c]);
    }
  }
  const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
  if (valid < bs) {  // the partial tail key block: columns past Lk never win the max and get p = 0
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {
      const int64_t n = valid - 16 * c;
      const __mmask16 keep = n >= 16 ? __mmask16(0xFFFF) : (n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u));
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r][c] = _mm512_mask_mov_ps(neg_inf, keep, acc[r][c]);
    }
  }
  float m_new[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    __m512 vmax = acc[r][0];
#pragma GCC unroll 8
    for (int c = 1; c < NC; ++c) vmax = _mm512_max_ps(vmax, acc[r][c]);
    const float mx = _mm512_reduce_max_ps(vmax);
    m_new[r] = mx > m[r] ? mx : m[r];  // finite: a kept block has at least one valid column
  }
  // alpha for the R rows in one vector exp2 (m_old = -inf on the first block gives exactly 0)
  const __mmask16 rows_mask = __mmask16((1u << R) - 1u);
  const __m512 mnew_v = _mm512_maskz_loadu_ps(rows_mask, m_new);
  const __m512 mold_v = _mm512_maskz_loadu_ps(rows_mask, m);
  _mm512_mask_storeu_ps(alpha, rows_mask, exp2_ps(_mm512_sub_ps(mold_v, mnew_v)));
  _mm512_mask_storeu_ps(m, rows_mask, mnew_v);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const __m512 mv = _mm512_set1_ps(m_new[r]);
    __m512 vsum = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {
      const __m512 e = exp2_ps(_mm512_sub_ps(acc[r][c], mv));
      _mm512_storeu_ps(p + r * bs + 16 * c, e);
      vsum = _mm512_add_ps(vsum, e);
    }
    l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(vsum);
  }
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
AS_AVX512_INLINE void qk_softmax_block(const float* qs, int64_t rows, int64_t dp, const float* kt, int64_t d,
                                       int64_t valid, float* p, float* m, float* l, float* alpha) {
  for (int64_t r0 = 0; r0 < rows; r0 += R)
    qk_softmax_tile<R, NC>(qs + r0 * dp, dp, kt, d, valid, p + r0 * 16 * NC, m + r0, l + r0, alpha + r0);
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

// K^T packing of one key block: dst[c][j] = src[j][c] for j < rows (zero for rows <= j < bs), c < d.
// 16x16 register transposes instead of a strided scalar loop: packing is paid once per used key block
// and at 90% sparsity a block is used by only ~1.6 query blocks, so its cost shows.
AS_AVX512 void pack_kt_avx512(const float* src, int64_t rows, int64_t d, int64_t bs, float* dst) {
  for (int64_t j0 = 0; j0 < bs; j0 += 16) {
    for (int64_t c0 = 0; c0 < d; c0 += 16) {
      const int64_t nc = d - c0 < 16 ? d - c0 : 16;
      const __mmask16 cmask = nc == 16 ? __mmask16(0xFFFF) : __mmask16((1u << nc) - 1u);
      __m512 r[16], t[16];
      for (int i = 0; i < 16; ++i)
        r[i] = (j0 + i < rows) ? _mm512_maskz_loadu_ps(cmask, src + (j0 + i) * d + c0) : _mm512_setzero_ps();
      for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
      }
      for (int i = 0; i < 4; ++i) {
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
      }
      for (int i = 0; i < 4; ++i) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
      }
      for (int i = 0; i < 8; ++i) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
      }
      for (int64_t c = 0; c < nc; ++c) _mm512_storeu_ps(dst + (c0 + c) * bs + j0, r[c]);
    }
  }
}

AS_AVX512 void attn_task_avx512(const AttnDims& dims, const AttnTask& t, const AttnScratch& sc) {
  const int64_t bs = dims.bs, d = dims.d, dp = dims.dp, nq = t.nq;
  const int64_t nvec_d = dp / 16;
  const __mmask16 dtail = (d % 16) ? __mmask16((1u << (d % 16)) - 1u) : __mmask16(0xFFFF);
  if (t.nk == 0) {  // no kept key block: the rows attend to nothing and output zeros
    for (int64_t r = 0; r < nq; ++r)
      for (int64_t c = 0; c < d; ++c) t.out[r * d + c] = 0.0f;
    return;
  }
  // Row tiles: the fused QK^T + softmax tile has R_QK = 256 / bs rows (16 accumulators), P.V uses R_PV
  // rows; both are powers of two dividing bs, so rounding nq up to the larger one covers both.
  const int64_t r_qk = 256 / bs;
  int pv_kind;  // (rows, vectors): 0 = (4,4), 1 = (4,3), 2 = (8,2), 3 = (8,1)
  if (nvec_d % 4 == 0) pv_kind = 0;
  else if (nvec_d == 3) pv_kind = 1;
  else if (nvec_d % 2 == 0) pv_kind = 2;
  else pv_kind = 3;
  const int64_t r_pv = pv_kind <= 1 ? 4 : 8;
  const int64_t r_all = r_qk > r_pv ? r_qk : r_pv;
  const int64_t rows = round_up(nq, r_all) < bs ? round_up(nq, r_all) : bs;

  // Scaled, zero-padded query block; zeroed accumulator; running max and sum.
  const __m512 qscale = _mm512_set1_ps(dims.qscale);
  for (int64_t r = 0; r < rows; ++r) {
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
    const int64_t valid = (kb == t.tail_kb) ? t.tail_valid : bs;
    switch (bs) {
      case 16: qk_softmax_block<16, 1>(sc.qs, rows, dp, kt, d, valid, sc.s, sc.m, sc.l, sc.alpha); break;
      case 32: qk_softmax_block<8, 2>(sc.qs, rows, dp, kt, d, valid, sc.s, sc.m, sc.l, sc.alpha); break;
      case 64: qk_softmax_block<4, 4>(sc.qs, rows, dp, kt, d, valid, sc.s, sc.m, sc.l, sc.alpha); break;
      default: qk_softmax_block<2, 8>(sc.qs, rows, dp, kt, d, valid, sc.s, sc.m, sc.l, sc.alpha); break;
    }
    switch (pv_kind) {
      case 0: pv_block<4, 4>(sc.s, rows, bs, valid, vp, dp, sc.alpha, sc.o); break;
      case 1: pv_block<4, 3>(sc.s, rows, bs, valid, vp, dp, sc.alpha, sc.o); break;
      case 2: pv_block<8, 2>(sc.s, rows, bs, valid, vp, dp, sc.alpha, sc.o); break;
      default: pv_block<8, 1>(sc.s, rows, bs, valid, vp, dp, sc.alpha, sc.o); break;
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
void pack_kt_avx512(const float*, int64_t, int64_t, int64_t, float*) {}
#endif

}  // namespace autosculpt
