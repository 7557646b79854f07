// Register-blocked micro-kernels of the pattern conv (included by pattern_conv_pack.cpp and
// pattern_conv_forward.cpp).
//
// Each computes an MR x (NV vectors) block of outputs over the whole K = ntaps * cin:
//   c[m][j] = bias[m] + sum_t sum_ci a[(t*cin + ci)*MR + m] * b[tap_off[t] + ci*ldb + j]
// The accumulators live in registers for the whole K loop (24 zmm for 8 x 3 on AVX-512), the weight
// is broadcast from the packed panel, the pixels are contiguous loads from the gathered tile.
//
// The AVX2 / AVX-512 versions carry GCC/Clang target attributes, so this file compiles with the
// plain x86-64 baseline and the caller picks a version after checking the CPU (cpu_features(), cpu_features.h).
#pragma once
#include <cstdint>

#include "cpu/pattern_conv.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define AUTOSCULPT_X86 1
#endif

namespace autosculpt {
namespace ukernels {

// Keeps a loaded vector in a register: without it GCC folds the load into every FMA that uses it
// (MR loads of the same pixels per k step instead of one), and the kernels become load-bound (worse
// still on the gather-free path, whose pixel loads are mostly split across cache lines).
#define AS_PIN(v) __asm__("" : "+v"(v))

// ---------------------------------------------------------------- portable (any CPU)
constexpr int kGenericMR = 4, kGenericLanes = 16, kGenericNV = 1;

template <int MR>
void generic_kernel(int64_t ntaps, const int64_t* tap_off, int64_t cin, int64_t ldb, const float* a,
                    const float* b, float* const* c, const float* bias) {
  float acc[MR][kGenericLanes] = {};
  for (int64_t t = 0; t < ntaps; ++t) {
    const float* bt = b + tap_off[t];
    for (int64_t ci = 0; ci < cin; ++ci) {
      const float* br = bt + ci * ldb;
      for (int m = 0; m < MR; ++m) {
        const float av = a[m];
#pragma omp simd
        for (int j = 0; j < kGenericLanes; ++j) acc[m][j] += av * br[j];
      }
      a += MR;
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < kGenericLanes; ++j) c[m][j] = acc[m][j] + bias[m];
}

inline const ConvMicroKernel* generic_table() {
  static const ConvMicroKernel table[kGenericMR * kGenericNV] = {
      &generic_kernel<1>, &generic_kernel<2>, &generic_kernel<3>, &generic_kernel<4>};
  return table;
}

#ifdef AUTOSCULPT_X86
// ---------------------------------------------------------------- AVX2 + FMA (16 ymm registers)
constexpr int kAvx2MR = 6, kAvx2Lanes = 8, kAvx2NV = 2;

template <int MR, int NV>
__attribute__((target("avx2,fma"))) void avx2_kernel(int64_t ntaps, const int64_t* tap_off, int64_t cin,
                                                     int64_t ldb, const float* a, const float* b, float* const* c,
                                                     const float* bias) {
  __m256 acc[MR][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_setzero_ps();
  for (int64_t t = 0; t < ntaps; ++t) {
    const float* br = b + tap_off[t];
    for (int64_t ci = 0; ci < cin; ++ci) {
      __m256 bv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        bv[v] = _mm256_loadu_ps(br + v * kAvx2Lanes);
        AS_PIN(bv[v]);
      }
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m256 av = _mm256_broadcast_ss(a + m);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_fmadd_ps(av, bv[v], acc[m][v]);
      }
      a += MR;
      br += ldb;
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    const __m256 bm = _mm256_set1_ps(bias[m]);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(c[m] + v * kAvx2Lanes, _mm256_add_ps(acc[m][v], bm));
  }
}

#define AS_AVX2_ROW(MR) &avx2_kernel<MR, 1>, &avx2_kernel<MR, 2>
inline const ConvMicroKernel* avx2_table() {
  static const ConvMicroKernel table[kAvx2MR * kAvx2NV] = {AS_AVX2_ROW(1), AS_AVX2_ROW(2), AS_AVX2_ROW(3),
                                                           AS_AVX2_ROW(4), AS_AVX2_ROW(5), AS_AVX2_ROW(6)};
  return table;
}
#undef AS_AVX2_ROW

// ---------------------------------------------------------------- AVX-512 (32 zmm registers)
constexpr int kAvx512MR = 8, kAvx512Lanes = 16, kAvx512NV = 3;

template <int MR, int NV>
__attribute__((target("avx512f,fma"))) void avx512_kernel(int64_t ntaps, const int64_t* tap_off, int64_t cin,
                                                          int64_t ldb, const float* a, const float* b,
                                                          float* const* c, const float* bias) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
  for (int64_t t = 0; t < ntaps; ++t) {
    const float* br = b + tap_off[t];
    for (int64_t ci = 0; ci < cin; ++ci) {
      __m512 bv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        bv[v] = _mm512_loadu_ps(br + v * kAvx512Lanes);
        AS_PIN(bv[v]);
      }
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m512 av = _mm512_set1_ps(a[m]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_fmadd_ps(av, bv[v], acc[m][v]);
      }
      a += MR;
      br += ldb;
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    const __m512 bm = _mm512_set1_ps(bias[m]);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c[m] + v * kAvx512Lanes, _mm512_add_ps(acc[m][v], bm));
  }
}

#define AS_AVX512_ROW(MR) &avx512_kernel<MR, 1>, &avx512_kernel<MR, 2>, &avx512_kernel<MR, 3>
inline const ConvMicroKernel* avx512_table() {
  static const ConvMicroKernel table[kAvx512MR * kAvx512NV] = {
      AS_AVX512_ROW(1), AS_AVX512_ROW(2), AS_AVX512_ROW(3), AS_AVX512_ROW(4),
      AS_AVX512_ROW(5), AS_AVX512_ROW(6), AS_AVX512_ROW(7), AS_AVX512_ROW(8)};
  return table;
}
#undef AS_AVX512_ROW

// Blocks of <= 4 filters (small pattern groups) fill the registers with two 48-pixel panels at once:
// up to 4 x 6 accumulators instead of 4 x 3 (and half the calls), so the FMA chains hide latency.
constexpr int kAvx512MR2 = 4;

template <int MR>
__attribute__((target("avx512f,fma"))) void avx512_kernel_2panels(int64_t ntaps, const int64_t* tap_off,
                                                                  int64_t cin, int64_t ldb, const float* a,
                                                                  const float* b, int64_t b2, float* const* c,
                                                                  const float* bias) {
  constexpr int NV = 6;  // 3 vectors from the panel at b, 3 from the panel at b + b2
  __m512 acc[MR][NV];
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 6
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
  for (int64_t t = 0; t < ntaps; ++t) {
    const float* br = b + tap_off[t];
    for (int64_t ci = 0; ci < cin; ++ci) {
      __m512 bv[NV];
#pragma GCC unroll 3
      for (int v = 0; v < 3; ++v) {
        bv[v] = _mm512_loadu_ps(br + v * kAvx512Lanes);
        bv[v + 3] = _mm512_loadu_ps(br + b2 + v * kAvx512Lanes);
        AS_PIN(bv[v]);
        AS_PIN(bv[v + 3]);
      }
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) {
        const __m512 av = _mm512_set1_ps(a[m]);
#pragma GCC unroll 6
        for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_fmadd_ps(av, bv[v], acc[m][v]);
      }
      a += MR;
      br += ldb;
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m) {
    const __m512 bm = _mm512_set1_ps(bias[m]);
#pragma GCC unroll 6
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c[m] + v * kAvx512Lanes, _mm512_add_ps(acc[m][v], bm));
  }
}

inline const ConvMicroKernel2* avx512_table_2panels() {
  static const ConvMicroKernel2 table[kAvx512MR2] = {&avx512_kernel_2panels<1>, &avx512_kernel_2panels<2>,
                                                     &avx512_kernel_2panels<3>, &avx512_kernel_2panels<4>};
  return table;
}
#endif  // AUTOSCULPT_X86

#undef AS_PIN
}  // namespace ukernels
}  // namespace autosculpt
