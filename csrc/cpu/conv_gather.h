// Gathering the input pixels a pattern-conv tile needs (included by pattern_conv_forward.cpp).
//
// A tile's gathered input is laid out [sub-tile][tap slot][channel][SW lanes], so the micro-kernel
// reads its B operand strictly sequentially. What to copy is described once per (tile, tap slot) as
// segments of at most 16 output pixels that lie on one output row: the source offset of the first
// pixel (channel 0), the destination lane, and a bit mask of lanes whose input pixel is inside the
// image (the others are the zero padding). The channel loop then replays the segments.
#pragma once
#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace autosculpt {

struct GatherSeg {
  int64_t src;      // offset of output lane 0's input pixel from the channel's base (may be "negative")
  int64_t dst;      // offset in the tile block (channel 0)
  int32_t len;      // lanes written, 1..16
  uint32_t valid;   // bit k: lane k reads input (else it is zero padding)
  uint32_t lo, hi;  // stride 2: `valid` spread to the even lanes of the two 16-float input halves
};

using GatherFn = void (*)(const GatherSeg* segs, int64_t nsegs, const float* src, int64_t src_cstride, float* dst,
                          int64_t dst_cstride, int64_t c0, int64_t c1, int64_t sw);

// Generic: any stride.
inline void gather_generic(const GatherSeg* segs, int64_t nsegs, const float* src, int64_t src_cstride,
                           float* dst, int64_t dst_cstride, int64_t c0, int64_t c1, int64_t sw) {
  for (int64_t ci = c0; ci < c1; ++ci) {
    const float* s = src + ci * src_cstride;
    float* d = dst + ci * dst_cstride;
    for (int64_t i = 0; i < nsegs; ++i) {
      const GatherSeg& g = segs[i];
      float* dd = d + g.dst;
      if (g.valid == (1u << g.len) - 1u && sw == 1) {
        const float* ss = s + g.src;
        for (int k = 0; k < g.len; ++k) dd[k] = ss[k];
      } else {
        for (int k = 0; k < g.len; ++k) dd[k] = ((g.valid >> k) & 1u) ? s[g.src + k * sw] : 0.f;
      }
    }
  }
}

#if defined(__x86_64__) || defined(_M_X64)
// AVX2, stride 1: two 8-lane masked loads/stores per segment (vmaskmov does not fault on masked lanes).
__attribute__((target("avx2"))) inline __m256i avx2_lane_mask(uint32_t bits) {
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(int(bits & 0xffu)), lane_bit), lane_bit);
}

__attribute__((target("avx2"))) inline void gather_avx2(const GatherSeg* segs, int64_t nsegs, const float* src,
                                                         int64_t src_cstride, float* dst, int64_t dst_cstride,
                                                         int64_t c0, int64_t c1, int64_t sw) {
  if (sw != 1) {
    gather_generic(segs, nsegs, src, src_cstride, dst, dst_cstride, c0, c1, sw);
    return;
  }
  for (int64_t i = 0; i < nsegs; ++i) {  // segment outer: masks stay in registers
    const GatherSeg& g = segs[i];
    const uint32_t store = (1u << g.len) - 1u;
    const __m256i st0 = avx2_lane_mask(store), st1 = avx2_lane_mask(store >> 8);
    const __m256i ld0 = avx2_lane_mask(g.valid), ld1 = avx2_lane_mask(g.valid >> 8);
    const float* s = src + c0 * src_cstride + g.src;
    float* d = dst + c0 * dst_cstride + g.dst;
    if (g.len > 8) {
      for (int64_t ci = c0; ci < c1; ++ci, s += src_cstride, d += dst_cstride) {
        _mm256_maskstore_ps(d, st0, _mm256_maskload_ps(s, ld0));
        _mm256_maskstore_ps(d + 8, st1, _mm256_maskload_ps(s + 8, ld1));
      }
    } else {
      for (int64_t ci = c0; ci < c1; ++ci, s += src_cstride, d += dst_cstride)
        _mm256_maskstore_ps(d, st0, _mm256_maskload_ps(s, ld0));
    }
  }
}

// AVX-512: one masked load (stride 1) or two loads + an even-lane permute (stride 2) per segment;
// masked-off lanes never touch memory, so padding needs no bounds checks.
__attribute__((target("avx512f"))) inline void gather_avx512(const GatherSeg* segs, int64_t nsegs,
                                                              const float* src, int64_t src_cstride, float* dst,
                                                              int64_t dst_cstride, int64_t c0, int64_t c1,
                                                              int64_t sw) {
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  // Segment outer, channel inner: the segment's masks and offsets stay in registers and each channel
  // costs one (stride 1) or two (stride 2) masked loads and one masked store.
  for (int64_t i = 0; i < nsegs; ++i) {
    const GatherSeg& g = segs[i];
    const __mmask16 store = __mmask16((1u << g.len) - 1u);
    const float* s = src + c0 * src_cstride + g.src;
    float* d = dst + c0 * dst_cstride + g.dst;
    if (sw == 1) {
      const __mmask16 m = __mmask16(g.valid);
      for (int64_t ci = c0; ci < c1; ++ci, s += src_cstride, d += dst_cstride)
        _mm512_mask_storeu_ps(d, store, _mm512_maskz_loadu_ps(m, s));
    } else {  // sw == 2
      const __mmask16 lo = __mmask16(g.lo), hi = __mmask16(g.hi);
      for (int64_t ci = c0; ci < c1; ++ci, s += src_cstride, d += dst_cstride) {
        const __m512 a = _mm512_maskz_loadu_ps(lo, s);
        const __m512 b = _mm512_maskz_loadu_ps(hi, s + 16);
        _mm512_mask_storeu_ps(d, store, _mm512_permutex2var_ps(a, even, b));
      }
    }
  }
}
#endif

}  // namespace autosculpt
