// Gathering the input pixels a pattern-conv tile needs (included by pattern_conv.cpp only).
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
// AVX-512: one masked load (stride 1) or two loads + an even-lane permute (stride 2) per segment;
// masked-off lanes never touch memory, so padding needs no bounds checks.
__attribute__((target("avx512f"))) inline void gather_avx512(const GatherSeg* segs, int64_t nsegs,
                                                              const float* src, int64_t src_cstride, float* dst,
                                                              int64_t dst_cstride, int64_t c0, int64_t c1,
                                                              int64_t sw) {
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  for (int64_t ci = c0; ci < c1; ++ci) {
    const float* s = src + ci * src_cstride;
    float* d = dst + ci * dst_cstride;
    if (sw == 1) {
      for (int64_t i = 0; i < nsegs; ++i) {
        const GatherSeg& g = segs[i];
        const __m512 v = _mm512_maskz_loadu_ps(__mmask16(g.valid), s + g.src);
        _mm512_mask_storeu_ps(d + g.dst, __mmask16((1u << g.len) - 1u), v);
      }
    } else {  // sw == 2
      for (int64_t i = 0; i < nsegs; ++i) {
        const GatherSeg& g = segs[i];
        const __m512 a = _mm512_maskz_loadu_ps(__mmask16(g.lo), s + g.src);
        const __m512 b = _mm512_maskz_loadu_ps(__mmask16(g.hi), s + g.src + 16);
        _mm512_mask_storeu_ps(d + g.dst, __mmask16((1u << g.len) - 1u), _mm512_permutex2var_ps(a, even, b));
      }
    }
  }
}
#endif

}  // namespace autosculpt
