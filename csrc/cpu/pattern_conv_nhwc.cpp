// Pattern-sparse 2-D convolution on channels-last (NHWC) float32 tensors, torch-free.
//
// Same semantics as pattern_conv.h (out = conv2d(x, weight * tap_mask[:, None], bias, ...) with an
// optional residual add and ReLU), for the layout the deployed form keeps from layer to layer: with
// activations in NHWC, dense convs run in oneDNN's native layout (no reorder per call) and this kernel
// reads its input rows directly, without gathering.
//
// Algorithm. Filters are sorted by tap mask (nesting-friendly order, so that neighbours share taps) and
// cut into blocks of 32 (two AVX-512 vectors of output channels); a block computes the union of its
// filters' taps (a filter that drops one of them has zero weights there). Blocks of empty filters
// are not computed (output = bias). Weights are packed per block as [tap][c_in][32]. For each image
// the input is copied once into a zero-padded NHWC buffer, so every tap of every output pixel is in
// bounds and the input of tap (r, s) for output pixel (oy, ox) is the row
// xpad[(oy*sh + r*dh) * Wp + ox*sw + s*dw][0 .. C_in). The micro-kernel holds MR pixels x 32
// channels in registers and runs over (tap, c_in): one broadcast of an input value per pixel and two
// weight vectors per step; taps whose inputs are adjacent in memory (s, s + 1 at dilation 1) run as
// one loop over their channels ("runs"). On AMD a 16-filter block whose two halves keep different
// taps runs each half's own taps on 8 lanes (tile_avx512_split). Output channels are written back to their original positions on store,
// with the bias, residual and ReLU applied there (the epilogue costs no extra pass over memory).
// Threads split (block, output row) items. Grouped convs are not handled here (the NCHW kernel is).
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/pattern_conv_nhwc.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "registry.h"

namespace autosculpt {

namespace {

constexpr int kBlock = 32;  // most output channels per block (two 16-lane vectors)
constexpr int kMaxMR = 16;  // most pixels per micro-kernel tile (16 for 8 lanes, 14 for 16, 8 for 32)

struct NhwcBlock {
  std::vector<int32_t> taps;  // union of kept taps (r * kw + s), ascending; split: those both halves keep
  bool split = false;         // 16 lanes whose halves (filters 0-7, 8-15) keep different taps (see tile_avx512_split)
  std::vector<int32_t> taps_lo, taps_hi;  // split: taps only the low / only the high half keeps
  int32_t nv = 2;             // 16-lane vectors of output channels (1 or 2); 0: one 8-lane (ymm) vector
  int32_t nfilt = 0;          // real filters (<= lanes); the other lanes have zero weights
  int32_t filters[kBlock];    // output channel of each lane
  int64_t w_offset = 0;       // start of [taps][c_in][16 * nv] in packed
  bool contiguous = false;    // filters[j] == filters[0] + j for j < nfilt (vector stores, masked past nfilt)
};

inline int lanes(const NhwcBlock& b) { return b.nv ? 16 * b.nv : 8; }
// Packed weights of a block per input channel, which are also its multiply-adds per output pixel and
// input channel: the union taps on every lane, a split block's own taps on 8 lanes.
inline int64_t lane_taps(const NhwcBlock& b) {
  return int64_t(b.taps.size()) * lanes(b) + int64_t(b.taps_lo.size() + b.taps_hi.size()) * 8;
}
inline int max_mr(int nv) { return nv == 2 ? 8 : (nv == 1 ? 14 : 16); }

// 8-lane blocks: on CPUs whose FMA units are 256 bits wide (AMD Zen 4 splits a 512-bit FMA in two
// halves), an 8-lane FMA costs half a 16-lane one, so the last 8 or fewer filters (c_out = 40: 32 + 8)
// run as an 8-lane block instead of a half-empty 16-lane one. Two leftovers of 8 still share a
// 16-lane block: its broadcasts serve 16 lanes, and it measured as fast as the two 8-lane blocks
// even when it computes the union of two masks' taps. Elsewhere (Intel: two 512-bit FMA ports) 16.
bool cpu_prefers_8_lanes() { return cpu_features().avx512vl && cpu_features().amd; }

bool cpu_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  return cpu_features().avx512f;
#else
  return false;
#endif
}

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};

float* aligned_scratch(std::unique_ptr<float[], FreeDeleter>& buf, size_t& cap, size_t floats) {
  if (floats > cap) {
    void* p = std::aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64);
    if (p == nullptr) throw std::bad_alloc();
    buf.reset(static_cast<float*>(p));
    cap = floats;
  }
  return buf.get();
}

// Everything one call needs.
struct NhwcCall {
  const float* xpad;  // (Hp, Wp, C) of the current image
  int64_t Wp, C;
  int64_t oh, ow, sh, sw, dh, dw, kw;
  float* out;         // (oh, ow, C_out) of the current image
  int64_t c_out;
  const float* bias;
  const float* residual;  // like out, or null
  bool relu;
  float hi;  // upper clamp after the ReLU (ReLU6: 6), +inf for none
};

inline float epilogue(float v, const NhwcCall& a, int64_t at, int32_t co) {
  v += a.bias ? a.bias[co] : 0.0f;
  if (a.residual) v += a.residual[at + co];
  v = (a.relu && v < 0.0f) ? 0.0f : v;  // NaN stays NaN, as torch.relu
  return v > a.hi ? a.hi : v;
}

// Stores a tile acc[MR][kBlock] (pixels ox0 .. ox0+valid) to the block's output channels.
inline void store_tile(const NhwcCall& a, const NhwcBlock& blk, int64_t oy, int64_t ox0, int64_t valid,
                       const float* acc) {
  for (int64_t i = 0; i < valid; ++i) {
    const int64_t at = (oy * a.ow + ox0 + i) * a.c_out;
    const float* row = acc + i * lanes(blk);
    float* o = a.out + at;
    for (int32_t j = 0; j < blk.nfilt; ++j) o[blk.filters[j]] = epilogue(row[j], a, at, blk.filters[j]);
  }
}

// Portable tile: plain loops (any CPU).
void tile_generic(const NhwcCall& a, const NhwcBlock& blk, const float* w, const int64_t* runs, int64_t oy,
                  int64_t ox0, int64_t valid) {
  float acc[kMaxMR * kBlock] = {0.0f};
  const int L = lanes(blk);
  const float* x0 = a.xpad + (oy * a.sh * a.Wp + ox0 * a.sw) * a.C;
  // the run lists: all lanes; for a split block also the low half's and the high half's own taps
  for (int seg = 0; seg < (blk.split ? 3 : 1); ++seg) {
    const int j0 = seg == 2 ? 8 : 0, width = seg == 0 ? L : 8;
    for (int64_t k = 0; k < runs[0]; ++k) {
      const float* xk = x0 + runs[1 + 2 * k];
      const int64_t len = runs[2 + 2 * k];
      for (int64_t i = 0; i < valid; ++i) {
        const float* xr = xk + i * a.sw * a.C;
        float* ac = acc + i * L + j0;
        for (int64_t c = 0; c < len; ++c) {
          const float xv = xr[c];
          const float* wc = w + c * width;
#pragma omp simd
          for (int j = 0; j < width; ++j) ac[j] += xv * wc[j];
        }
      }
      w += len * width;
    }
    runs += 1 + 2 * runs[0];
  }
  store_tile(a, blk, oy, ox0, valid, acc);
}

#if defined(__x86_64__) && defined(__GNUC__)
// Bias, residual, activation and store of an MR x NV-vector tile of accumulators.
template <int MR, int NV>
__attribute__((target("avx512f,fma"), always_inline)) inline void store_acc(const NhwcCall& a, const NhwcBlock& blk,
                                                                            __m512 (&acc)[MR][NV], int64_t oy,
                                                                            int64_t ox0) {
  if (blk.contiguous) {  // consecutive output channels: the epilogue on vectors, straight from registers
    const int32_t c0 = blk.filters[0];
    __m512 bias[NV];
    __mmask16 live[NV];  // lanes past nfilt (a partial block) are neither read nor written
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      live[v] = __mmask16((1u << std::max(0, std::min(16, blk.nfilt - 16 * v))) - 1u);
      bias[v] = a.bias ? _mm512_maskz_loadu_ps(live[v], a.bias + c0 + 16 * v) : _mm512_setzero_ps();
    }
    const __m512 zero = _mm512_setzero_ps(), hi = _mm512_set1_ps(a.hi);
    const bool clamp = a.hi < std::numeric_limits<float>::infinity();
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const int64_t at = (oy * a.ow + ox0 + i) * a.c_out + c0;
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) {
        __m512 o = _mm512_add_ps(acc[i][v], bias[v]);
        if (a.residual) o = _mm512_add_ps(o, _mm512_maskz_loadu_ps(live[v], a.residual + at + 16 * v));
        if (a.relu) o = _mm512_max_ps(zero, o);  // max_ps returns its 2nd operand on NaN: NaN stays
        if (clamp) o = _mm512_min_ps(hi, o);
        _mm512_mask_storeu_ps(a.out + at + 16 * v, live[v], o);
      }
    }
    return;
  }
  // Filters of several masks: lanes go to their channels with a scatter (and gathers for the bias and
  // residual); lanes past nfilt are masked off.
  __m512i idx[NV];
  __mmask16 live[NV];
  __m512 bias[NV];
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v) {
    idx[v] = _mm512_loadu_si512(blk.filters + 16 * v);
    const int n_live = std::max(0, std::min(16, blk.nfilt - 16 * v));
    live[v] = __mmask16((1u << n_live) - 1u);
    bias[v] = a.bias ? _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live[v], idx[v], a.bias, 4) : _mm512_setzero_ps();
  }
  const __m512 zero = _mm512_setzero_ps(), hi = _mm512_set1_ps(a.hi);
  const bool clamp = a.hi < std::numeric_limits<float>::infinity();
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    const int64_t at = (oy * a.ow + ox0 + i) * a.c_out;
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      __m512 o = _mm512_add_ps(acc[i][v], bias[v]);
      if (a.residual) o = _mm512_add_ps(o, _mm512_mask_i32gather_ps(zero, live[v], idx[v], a.residual + at, 4));
      if (a.relu) o = _mm512_max_ps(zero, o);
      if (clamp) o = _mm512_min_ps(hi, o);
      _mm512_mask_i32scatter_ps(a.out + at, live[v], idx[v], o, 4);
    }
  }
}

// acc[i][v] += the NV x 16-lane weights of the run list at runs times input pixel i, over every run
// (weights [k][16 * NV] read straight through; w advances past them).
template <int MR, int NV>
__attribute__((target("avx512f,fma"), always_inline)) inline void accumulate_16(const float* x0, int64_t px,
                                                                                const int64_t* runs, const float*& w,
                                                                                __m512 (&acc)[MR][NV]) {
  for (int64_t k = 0; k < runs[0]; ++k) {
    const float* xr = x0 + runs[1 + 2 * k];
    const int64_t len = runs[2 + 2 * k];
    for (int64_t c = 0; c < len; ++c) {
      __m512 wv[NV];
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) wv[v] = _mm512_load_ps(w + c * (16 * NV) + 16 * v);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const __m512 xv = _mm512_set1_ps(xr[i * px + c]);
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(xv, wv[v], acc[i][v]);
      }
    }
    w += len * (16 * NV);
  }
}

// MR pixels x NV vectors of 16 output channels in registers over the whole (tap, c_in) reduction.
template <int MR, int NV>
__attribute__((target("avx512f,fma"))) void tile_avx512(const NhwcCall& a, const NhwcBlock& blk, const float* w,
                                                        const int64_t* runs, int64_t oy, int64_t ox0) {
  __m512 acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  accumulate_16<MR, NV>(a.xpad + (oy * a.sh * a.Wp + ox0 * a.sw) * a.C, a.sw * a.C, runs, w, acc);
  store_acc<MR, NV>(a, blk, acc, oy, ox0);
}

// acc[i] += the 8-lane weights of the run list at runs times input pixel i, over every run (8 filters,
// weights [k][8] read straight through; w advances past them).
template <int MR>
__attribute__((target("avx512f,avx512vl,fma"), always_inline)) inline void accumulate_8(const float* x0, int64_t px,
                                                                                        const int64_t* runs,
                                                                                        const float*& w,
                                                                                        __m256 (&acc)[MR]) {
  for (int64_t k = 0; k < runs[0]; ++k) {
    const float* xr = x0 + runs[1 + 2 * k];
    const int64_t len = runs[2 + 2 * k];
    for (int64_t c = 0; c < len; ++c) {
      const __m256 wv = _mm256_load_ps(w + c * 8);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(xr[i * px + c]), wv, acc[i]);
    }
    w += len * 8;
  }
}

// Split 16-lane block (CPUs with 256-bit FMA units): filters 0-7 and 8-15 have different tap sets.
// The taps both halves keep run on 16 lanes; those only one half keeps run on that half's 8 lanes
// (a 256-bit FMA, half the cost of a 512-bit one there), in accumulators of their own added in at
// the end, instead of 16 lanes over the union of all taps. runs: the three run lists (both, low
// half only, high half only), weights [both][c][16], [low][c][8], [high][c][8].
template <int MR>
__attribute__((target("avx512f,avx512vl,avx512dq,fma"))) void tile_avx512_split(const NhwcCall& a,
                                                                               const NhwcBlock& blk,
                                                                               const float* w,
                                                                               const int64_t* runs, int64_t oy,
                                                                               int64_t ox0) {
  __m512 acc[MR][1];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) acc[i][0] = _mm512_setzero_ps();
  const int64_t px = a.sw * a.C;
  const float* x0 = a.xpad + (oy * a.sh * a.Wp + ox0 * a.sw) * a.C;
  accumulate_16<MR, 1>(x0, px, runs, w, acc);
  __m256 half[2][MR];
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    runs += 1 + 2 * runs[0];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) half[h][i] = _mm256_setzero_ps();
    accumulate_8<MR>(x0, px, runs, w, half[h]);
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
    acc[i][0] = _mm512_add_ps(acc[i][0], _mm512_insertf32x8(_mm512_castps256_ps512(half[0][i]), half[1][i], 1));
  store_acc<MR, 1>(a, blk, acc, oy, ox0);
}

// MR pixels x 8 output channels (one ymm vector) over the (tap, c_in) reduction; the epilogue on the
// vector for 8 consecutive channels, else lane by lane.
template <int MR>
__attribute__((target("avx512f,avx512vl,fma"))) void tile_avx512_8(const NhwcCall& a, const NhwcBlock& blk,
                                                                  const float* w, const int64_t* runs, int64_t oy,
                                                                  int64_t ox0) {
  __m256 acc[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_ps();
  accumulate_8<MR>(a.xpad + (oy * a.sh * a.Wp + ox0 * a.sw) * a.C, a.sw * a.C, runs, w, acc);
  if (blk.contiguous) {
    const int32_t c0 = blk.filters[0];
    const __mmask8 live = __mmask8((1u << std::min(8, blk.nfilt)) - 1u);
    const __m256 bias = a.bias ? _mm256_maskz_loadu_ps(live, a.bias + c0) : _mm256_setzero_ps();
    const __m256 zero = _mm256_setzero_ps(), hi = _mm256_set1_ps(a.hi);
    const bool clamp = a.hi < std::numeric_limits<float>::infinity();
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const int64_t at = (oy * a.ow + ox0 + i) * a.c_out + c0;
      __m256 o = _mm256_add_ps(acc[i], bias);
      if (a.residual) o = _mm256_add_ps(o, _mm256_maskz_loadu_ps(live, a.residual + at));
      if (a.relu) o = _mm256_max_ps(zero, o);  // NaN stays (max_ps returns its 2nd operand on NaN)
      if (clamp) o = _mm256_min_ps(hi, o);
      _mm256_mask_storeu_ps(a.out + at, live, o);
    }
    return;
  }
  // Filters of one mask scattered over the channels: lane j goes to channel filters[j] (masked past nfilt).
  const __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.filters));
  const __mmask8 live = __mmask8((1u << std::min(8, blk.nfilt)) - 1u);
  const __m256 zero = _mm256_setzero_ps(), hi = _mm256_set1_ps(a.hi);
  const bool clamp = a.hi < std::numeric_limits<float>::infinity();
  const __m256 bias = a.bias ? _mm256_mmask_i32gather_ps(zero, live, idx, a.bias, 4) : zero;
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    const int64_t at = (oy * a.ow + ox0 + i) * a.c_out;
    __m256 o = _mm256_add_ps(acc[i], bias);
    if (a.residual) o = _mm256_add_ps(o, _mm256_mmask_i32gather_ps(zero, live, idx, a.residual + at, 4));
    if (a.relu) o = _mm256_max_ps(zero, o);
    if (clamp) o = _mm256_min_ps(hi, o);
    _mm256_mask_i32scatter_ps(a.out + at, live, idx, o, 4);
  }
}

// The epilogue of a conv whose blocks are not on consecutive channels, for output pixels [p0, p1): the
// tiles stored every block's raw sums as vectors in tmp (vl lanes per pixel, block after block); each
// 16 output channels gather their lanes (pos[c]: lane of channel c, -1 for an empty filter: 0) and
// get bias, residual and activation on vectors. Cheaper than scattering each block's lanes (and
// gathering its residual) from the tiles: 16-channel layers spent a third of their time there.
__attribute__((target("avx512f"))) void gather_epilogue(const NhwcCall& a, const float* tmp, int64_t vl,
                                                        const int32_t* pos, int64_t p0, int64_t p1) {
  const __m512 zero = _mm512_setzero_ps(), hi = _mm512_set1_ps(a.hi);
  const __m512i none = _mm512_set1_epi32(-1);
  const bool clamp = a.hi < std::numeric_limits<float>::infinity();
  for (int64_t p = p0; p < p1; ++p) {
    const float* src = tmp + p * vl;
    float* o = a.out + p * a.c_out;
    const float* r = a.residual ? a.residual + p * a.c_out : nullptr;
    // up to 64 lanes: the pixel's sums in registers, channels picked by two-source permutes (a
    // gather from L1 costs several times more on Zen 4); wider: gathers
    __m512 t[4];
    if (vl <= 64)
      for (int k = 0; k < 4; ++k)
        t[k] = _mm512_maskz_loadu_ps(__mmask16((1u << std::max<int64_t>(0, std::min<int64_t>(16, vl - 16 * k))) - 1u),
                                     src + 16 * k);
    for (int64_t c0 = 0; c0 < a.c_out; c0 += 16) {
      const __mmask16 live = __mmask16((1u << std::min<int64_t>(16, a.c_out - c0)) - 1u);
      const __m512i idx = _mm512_loadu_si512(pos + c0);  // (pos is padded to whole vectors with -1)
      const __mmask16 kept = _mm512_mask_cmpgt_epi32_mask(live, idx, none);
      __m512 v;
      if (vl <= 32) {
        v = _mm512_maskz_permutex2var_ps(kept, t[0], idx, t[1]);
      } else if (vl <= 64) {
        const __mmask16 upper = _mm512_mask_cmpgt_epi32_mask(kept, idx, _mm512_set1_epi32(31));
        v = _mm512_maskz_permutex2var_ps(kept, t[0], idx, t[1]);  // (uses the index's low 5 bits)
        v = _mm512_mask_mov_ps(v, upper, _mm512_permutex2var_ps(t[2], idx, t[3]));
      } else {
        v = _mm512_mask_i32gather_ps(zero, kept, idx, src, 4);
      }
      if (a.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(live, a.bias + c0));
      if (r) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(live, r + c0));
      if (a.relu) v = _mm512_max_ps(zero, v);  // NaN stays
      if (clamp) v = _mm512_min_ps(hi, v);
      _mm512_mask_storeu_ps(o + c0, live, v);
    }
  }
}

using TileFn = void (*)(const NhwcCall&, const NhwcBlock&, const float*, const int64_t*, int64_t, int64_t);
const TileFn kAvx512Tiles8[kMaxMR + 1] = {
    nullptr,           &tile_avx512_8<1>,  &tile_avx512_8<2>,  &tile_avx512_8<3>,  &tile_avx512_8<4>,
    &tile_avx512_8<5>, &tile_avx512_8<6>,  &tile_avx512_8<7>,  &tile_avx512_8<8>,  &tile_avx512_8<9>,
    &tile_avx512_8<10>, &tile_avx512_8<11>, &tile_avx512_8<12>, &tile_avx512_8<13>, &tile_avx512_8<14>,
    &tile_avx512_8<15>, &tile_avx512_8<16>};
#define AS_NHWC_TILES(NV)                                                                                       \
  {nullptr, &tile_avx512<1, NV>, &tile_avx512<2, NV>, &tile_avx512<3, NV>, &tile_avx512<4, NV>,                 \
   &tile_avx512<5, NV>, &tile_avx512<6, NV>, &tile_avx512<7, NV>, &tile_avx512<8, NV>, AS_NHWC_TAIL_##NV}
#define AS_NHWC_TAIL_1 &tile_avx512<9, 1>, &tile_avx512<10, 1>, &tile_avx512<11, 1>, &tile_avx512<12, 1>, \
                       &tile_avx512<13, 1>, &tile_avx512<14, 1>, nullptr, nullptr
#define AS_NHWC_TAIL_2 nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr
const TileFn kAvx512Tiles[2][kMaxMR + 1] = {AS_NHWC_TILES(1), AS_NHWC_TILES(2)};
constexpr int kSplitMR = 8;  // 8 zmm + 16 ymm accumulators
const TileFn kAvx512TilesSplit[kSplitMR + 1] = {
    nullptr, &tile_avx512_split<1>, &tile_avx512_split<2>, &tile_avx512_split<3>, &tile_avx512_split<4>,
    &tile_avx512_split<5>, &tile_avx512_split<6>, &tile_avx512_split<7>, &tile_avx512_split<8>};
#endif

// Sort key putting nested PAPER6-style masks next to each other: by tap count, then by mask bits.
uint64_t mask_bits(const uint8_t* m, int64_t taps) {
  uint64_t b = 0;
  for (int64_t t = 0; t < taps && t < 64; ++t) b |= uint64_t(m[t] != 0) << t;
  return b;
}

}  // namespace

class PackedPatternConvNhwc {
 public:
  PackedPatternConvNhwc(const float* weight, const uint8_t* tap_mask, int64_t c_out, int64_t c_in, int64_t kh,
                        int64_t kw)
      : c_out_(c_out), c_in_(c_in), kh_(kh), kw_(kw), avx512_(cpu_avx512()) {
    const bool eight = avx512_ && cpu_prefers_8_lanes();
    if (c_out < 1 || c_in < 1 || kh < 1 || kw < 1 || kh * kw > 64)
      throw std::invalid_argument("PackedPatternConvNhwc: bad sizes (kh * kw must be <= 64)");
    const int64_t taps = kh * kw;
    // Filters grouped by identical mask (empty ones are bias only).
    std::vector<std::pair<uint64_t, std::vector<int32_t>>> groups;
    for (int32_t f = 0; f < c_out; ++f) {
      const uint64_t bits = mask_bits(tap_mask + f * taps, taps);
      if (!bits) {
        empty_.push_back(f);
        continue;
      }
      auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == bits; });
      if (it == groups.end()) groups.push_back({bits, {f}});
      else it->second.push_back(f);
    }
    // Whole blocks of one mask compute exactly its taps: 32 filters, then 16.
    std::vector<std::pair<uint64_t, std::vector<int32_t>>> rest;
    for (auto& g : groups) {
      size_t i = 0;
      for (; i + kBlock <= g.second.size(); i += kBlock) add_block(g.first, g.second.data() + i, kBlock, 2);
      if (i + 16 <= g.second.size()) {
        add_block(g.first, g.second.data() + i, 16, 1);
        i += 16;
      }
      if (i < g.second.size()) rest.push_back({g.first, std::vector<int32_t>(g.second.begin() + long(i), g.second.end())});
    }
    // Leftovers (< 16 filters per mask) share 16-filter blocks computing the union of their taps:
    // greedily, each block starts from the largest leftover and takes the masks adding fewest taps.
    // The last 8 or fewer run as an 8-lane block where those are cheaper (measured on Zen 4: two 8-lane
    // blocks cost as much as one 16-lane block of the union of their taps, so leftovers pair up).
    while (!rest.empty()) {
      // (largest first, ties by first filter: a conv whose filters were put in filter_order() forms the
      // same blocks again, each on consecutive channels)
      std::stable_sort(rest.begin(), rest.end(), [](const auto& x, const auto& y) {
        return x.second.size() != y.second.size() ? x.second.size() > y.second.size() : x.second[0] < y.second[0];
      });
      uint64_t uni = 0;
      std::vector<int32_t> lanes_f;
      size_t left = 0;
      for (const auto& g : rest) left += g.second.size();
      const size_t width = eight && left <= 8 ? 8 : 16;
      while (lanes_f.size() < width && !rest.empty()) {
        size_t best = 0;
        int best_new = 1 << 30;
        for (size_t k = 0; k < rest.size(); ++k) {
          const int added = __builtin_popcountll(rest[k].first & ~uni);
          if (lanes_f.empty() ? k == 0 : added < best_new) {
            best = k;
            best_new = added;
          }
        }
        auto& g = rest[best];
        const size_t take = std::min<size_t>(width - lanes_f.size(), g.second.size());
        lanes_f.insert(lanes_f.end(), g.second.begin(), g.second.begin() + long(take));
        uni |= g.first;
        g.second.erase(g.second.begin(), g.second.begin() + long(take));
        if (g.second.empty()) rest.erase(rest.begin() + long(best));
      }
      add_block(uni, lanes_f.data(), int32_t(lanes_f.size()), width == 8 ? 0 : 1);
    }
    // 16-lane blocks whose halves keep different taps split where 8-lane FMAs are cheaper.
    if (eight)
      for (NhwcBlock& blk : blocks_) {
        if (blk.nv != 1 || blk.nfilt <= 8) continue;
        uint64_t lo = 0, hi = 0;
        for (int32_t j = 0; j < blk.nfilt; ++j) (j < 8 ? lo : hi) |= mask_bits(tap_mask + blk.filters[j] * taps, taps);
        if (lo == hi) continue;
        blk.split = true;
        blk.taps.clear();
        for (int64_t t = 0; t < taps; ++t) {
          const bool l = lo >> t & 1, h = hi >> t & 1;
          if (l && h) blk.taps.push_back(int32_t(t));
          else if (l) blk.taps_lo.push_back(int32_t(t));
          else if (h) blk.taps_hi.push_back(int32_t(t));
        }
      }
    int64_t total = 0;
    for (NhwcBlock& blk : blocks_) {
      blk.w_offset = total;  // a multiple of 16 floats: aligned loads of every block's vectors
      total += lane_taps(blk) * c_in;
      total = (total + 15) / 16 * 16;
    }
    packed_.reset(static_cast<float*>(std::aligned_alloc(64, size_t(std::max<int64_t>(total, 16) * 4 + 63) / 64 * 64)));
    if (!packed_) throw std::bad_alloc();
    std::fill(packed_.get(), packed_.get() + total, 0.0f);
    for (const NhwcBlock& blk : blocks_) {
      // segments [taps][c_in][lanes], then (split) [taps_lo][c_in][8] for lanes 0-7, [taps_hi][c_in][8]
      // for lanes 8-15
      int64_t at = blk.w_offset;
      const struct {
        const std::vector<int32_t>* list;
        int32_t j0, width;
      } segs[3] = {{&blk.taps, 0, lanes(blk)}, {&blk.taps_lo, 0, 8}, {&blk.taps_hi, 8, 8}};
      for (const auto& sg : segs) {
        for (size_t t = 0; t < sg.list->size(); ++t) {
          const int32_t tap = (*sg.list)[t];
          for (int32_t j = sg.j0; j < std::min(blk.nfilt, sg.j0 + sg.width); ++j) {
            const int32_t f = blk.filters[j];
            if (!tap_mask[f * taps + tap]) continue;  // a filter that drops this tap: zero weights
            for (int64_t c = 0; c < c_in; ++c) {
              const int64_t k = int64_t(t) * c_in + c;  // (halves: channel pairs, [k / 2][filter][k % 2])
              packed_[at + k * sg.width + (j - sg.j0)] =
                  weight[(int64_t(f) * c_in + c) * taps + tap];
            }
          }
        }
        at += int64_t(sg.list->size()) * c_in * sg.width;
      }
    }
    // Blocks off consecutive channels: the same blocks writing raw sums to consecutive lanes of a
    // scratch image, and the lane of every output channel for the gathering epilogue.
    gathered_ = std::any_of(blocks_.begin(), blocks_.end(), [](const NhwcBlock& b) { return !b.contiguous; });
    if (gathered_) {
      vpos_.assign(size_t((c_out + 15) / 16 * 16), -1);
      for (NhwcBlock blk : blocks_) {
        for (int32_t j = 0; j < blk.nfilt; ++j) vpos_[size_t(blk.filters[j])] = int32_t(vlanes_ + j);
        for (int32_t j = 0; j < lanes(blk); ++j) blk.filters[j] = int32_t(vlanes_ + j);
        blk.nfilt = lanes(blk);
        blk.contiguous = true;
        vlanes_ += lanes(blk);
        vblocks_.push_back(blk);
      }
    }
  }

  // x: (n, h, w, c_in) contiguous; out: (n, oh, ow, c_out) contiguous; residual like out or null.
  void forward(const float* x, const float* bias, float* out, int64_t n, int64_t h, int64_t w, int64_t sh, int64_t sw,
               int64_t ph, int64_t pw, int64_t dh, int64_t dw, int num_threads, const float* residual, bool relu,
               bool force_generic, float clamp_max = std::numeric_limits<float>::infinity()) const {
    const int64_t oh = (h + 2 * ph - dh * (kh_ - 1) - 1) / sh + 1, ow = (w + 2 * pw - dw * (kw_ - 1) - 1) / sw + 1;
    if (n < 0 || h < 1 || w < 1 || sh < 1 || sw < 1 || ph < 0 || pw < 0 || dh < 1 || dw < 1 || oh < 1 || ow < 1)
      throw std::invalid_argument("PackedPatternConvNhwc.forward: bad sizes");
    if (num_threads <= 0) num_threads = omp_get_max_threads();
    // Rows and columns the tiles may read: up to (oh-1)*sh + (kh-1)*dh + 1 and (ow-1)*sw + (kw-1)*dw + 1
    // (every tile, the row's last one included, covers exactly its pixels).
    const int64_t Hp = std::max<int64_t>(h + 2 * ph, (oh - 1) * sh + (kh_ - 1) * dh + 1);
    const int64_t Wp = std::max<int64_t>(w + 2 * pw, (ow - 1) * sw + (kw_ - 1) * dw + 1);
    const int64_t C = c_in_;
    const bool use_avx512 = avx512_ && !force_generic;
    const int64_t nb = int64_t(blocks_.size());
    const int64_t macs = n * oh * ow * std::max<int64_t>(1, executed_macs_per_pixel());
    const int threads = int(std::max<int64_t>(1, std::min<int64_t>(num_threads, macs / 200000)));
    static thread_local std::unique_ptr<float[], FreeDeleter> pad_buf;
    static thread_local size_t pad_cap = 0;
    const size_t pad_floats = size_t(Hp * Wp * C + 31) / 16 * 16;
    // Blocks off consecutive channels (AVX-512): raw sums into a scratch image after the padded copy,
    // then the gathering epilogue.
    const bool gather = gathered_ && use_avx512;
    const size_t scratch_floats = pad_floats + (gather ? size_t(oh * ow * vlanes_) : 0);
    const std::vector<NhwcBlock>& run_blocks = gather ? vblocks_ : blocks_;
    // One image: its zero-padded copy, the empty filters, the blocks x rows; called inside a parallel
    // region, whose threads share the three loops.
    // Without padding (1x1 convs, linear layers, unpadded convs) the tiles read the image in place.
    const bool in_place = ph == 0 && pw == 0 && Hp == h && Wp == w;
    // Each block's taps as runs over the input row: taps whose inputs follow each other in memory
    // (s and s + 1 of one row at dilation 1: the C channels of one then of the other) are one run of
    // their channels, so a dense 3x3 row is one loop of 3 * C steps instead of three of C (and no
    // tap index arithmetic inside the tile). runs: per block [count, (input offset, length) ...]; the
    // packed weights are [tap][c_in] in the same order, read straight through.
    // A split block has three lists one after the other: its taps_, taps_lo and taps_hi.
    std::vector<int64_t> runs, run_at(static_cast<size_t>(nb));
    for (int64_t b = 0; b < nb; ++b) {
      const NhwcBlock& blk = blocks_[size_t(b)];
      run_at[size_t(b)] = int64_t(runs.size());
      for (const std::vector<int32_t>* list : {&blk.taps, &blk.taps_lo, &blk.taps_hi}) {
        const size_t count = runs.size();
        runs.push_back(0);
        for (int32_t t : *list) {
          const int64_t off = ((t / kw_) * dh * Wp + (t % kw_) * dw) * C;
          if (runs[count] > 0 && runs[runs.size() - 2] + runs.back() == off) {
            runs.back() += C;
            continue;
          }
          runs.push_back(off);
          runs.push_back(C);
          ++runs[count];
        }
      }
    }
    auto run_image = [&](int64_t img, float* xpad) {
      const float* xi = x + img * h * w * C;
      float* oi = out + img * oh * ow * c_out_;
      const float* ri = residual ? residual + img * oh * ow * c_out_ : nullptr;
      NhwcCall a{in_place ? xi : xpad, Wp, C, oh, ow, sh, sw, dh, dw, kw_, oi, c_out_, bias, ri, relu, clamp_max};
      float* tmp = xpad + pad_floats;
      NhwcCall raw{a.xpad, Wp, C, oh, ow, sh, sw, dh, dw, kw_, tmp, vlanes_, nullptr, nullptr, false,
                   std::numeric_limits<float>::infinity()};
      const NhwcCall& tile_call = gather ? raw : a;
#pragma omp for schedule(static)
      for (int64_t y = 0; y < (nb && !in_place ? Hp : 0); ++y) {  // (nothing to copy in place / all empty)
        float* dst = xpad + y * Wp * C;
        const int64_t sy = y - ph;
        if (sy < 0 || sy >= h) {
          std::memset(dst, 0, size_t(Wp * C) * sizeof(float));
          continue;
        }
        std::memset(dst, 0, size_t(pw * C) * sizeof(float));
        std::memcpy(dst + pw * C, xi + sy * w * C, size_t(w * C) * sizeof(float));
        std::memset(dst + (pw + w) * C, 0, size_t((Wp - pw - w) * C) * sizeof(float));
      }
      // Empty filters: bias (and the epilogue) only, a constant per filter without a residual.
      // (the empty filters' channels are no tile's: no barrier before the tiles)
      if (gather || empty_.empty()) {
        // (gathering epilogue: empty filters are its lanes of -1)
      } else if (ri == nullptr) {
        std::vector<float> value(empty_.size());
        for (size_t k = 0; k < empty_.size(); ++k) value[k] = epilogue(0.0f, a, 0, empty_[k]);
#pragma omp for schedule(static) nowait
        for (int64_t p = 0; p < oh * ow; ++p) {
          float* o = oi + p * c_out_;
          for (size_t k = 0; k < empty_.size(); ++k) o[empty_[k]] = value[k];
        }
      } else {
#pragma omp for schedule(static) nowait
        for (int64_t p = 0; p < oh * ow; ++p)
          for (int32_t f : empty_) oi[p * c_out_ + f] = epilogue(0.0f, a, p * c_out_, f);
      }
#pragma omp for collapse(2) schedule(static)
      for (int64_t b = 0; b < nb; ++b)
        for (int64_t oy = 0; oy < oh; ++oy) {
          const NhwcBlock& blk = run_blocks[size_t(b)];
          const float* wb = packed_.get() + blk.w_offset;
          const int64_t* br = runs.data() + run_at[size_t(b)];
          int64_t ox0 = 0;
#if defined(__x86_64__) && defined(__GNUC__)
          if (use_avx512) {
            const int64_t mr = blk.split ? pick_mr(ow, 2) : pick_mr(ow, blk.nv);
            const TileFn* tiles = blk.split ? kAvx512TilesSplit : blk.nv ? kAvx512Tiles[blk.nv - 1] : kAvx512Tiles8;
            for (; ox0 + mr <= ow; ox0 += mr) tiles[mr](tile_call, blk, wb, br, oy, ox0);
            if (ox0 < ow) tiles[ow - ox0](tile_call, blk, wb, br, oy, ox0);
            continue;
          }
#endif
          for (; ox0 < ow; ox0 += kMaxMR) tile_generic(a, blk, wb, br, oy, ox0, std::min<int64_t>(kMaxMR, ow - ox0));
        }
#if defined(__x86_64__) && defined(__GNUC__)
      if (gather) {
#pragma omp for schedule(static)
        for (int64_t oy = 0; oy < oh; ++oy) gather_epilogue(a, tmp, vlanes_, vpos_.data(), oy * ow, (oy + 1) * ow);
      }
#endif
    };
    // A batch of at least one image per thread (and evenly split, or many): each thread runs whole
    // images with its own padded buffer, no barrier between the loops of an image. Small layers of a
    // batch (the digits CNN's 8x8 maps) otherwise spend as long in barriers as in the tiles.
    if (threads_take_whole_images(n, threads)) {
#pragma omp parallel for schedule(static) num_threads(threads)
      for (int64_t img = 0; img < n; ++img) {
        float* xpad = aligned_scratch(pad_buf, pad_cap, scratch_floats);
#pragma omp parallel num_threads(1)
        run_image(img, xpad);
      }
      return;
    }
    float* xpad = aligned_scratch(pad_buf, pad_cap, scratch_floats);
    for (int64_t img = 0; img < n; ++img) {
#pragma omp parallel num_threads(threads)
      run_image(img, xpad);
    }
  }

  NhwcConvShape shape() const { return {c_out_, kh_, kw_}; }
  int64_t num_blocks() const { return int64_t(blocks_.size()); }
  // Blocks whose filters are consecutive output channels (their epilogue stores vectors, no scatter).
  int64_t contiguous_blocks() const {
    return std::count_if(blocks_.begin(), blocks_.end(), [](const NhwcBlock& b) { return b.contiguous; });
  }
  // 16-lane blocks whose halves run their own taps on 8 lanes (CPUs with 256-bit FMA units).
  int64_t split_blocks() const {
    return std::count_if(blocks_.begin(), blocks_.end(), [](const NhwcBlock& b) { return b.split; });
  }
  // Every filter once, block by block (each block's filters in lane order), the empty filters last: a
  // conv whose filters are permuted into this order has every block on consecutive channels.
  std::vector<int32_t> filter_order() const {
    std::vector<int32_t> order;
    order.reserve(size_t(c_out_));
    for (const NhwcBlock& b : blocks_) order.insert(order.end(), b.filters, b.filters + b.nfilt);
    order.insert(order.end(), empty_.begin(), empty_.end());
    return order;
  }
  // Multiply-adds per output pixel actually executed (union taps x 32 lanes per block).
  int64_t executed_macs_per_pixel() const {
    int64_t s = 0;
    for (const NhwcBlock& b : blocks_)
      s += lane_taps(b) * c_in_;
    return s;
  }

 private:
  // Pixels per tile: the largest size up to the register budget that divides the row (no tail:
  // 7 or 14 for 56/28/14/7, 8 for 32/16/8), else the budget.
  static int64_t pick_mr(int64_t ow, int nv) {
    const int64_t top = max_mr(nv);
    for (int64_t m = top; m >= top / 2 + 1; --m)
      if (ow % m == 0) return m;
    return std::min<int64_t>(top, ow);
  }

  void add_block(uint64_t taps_bits, const int32_t* filters, int32_t nfilt, int32_t nv) {
    NhwcBlock blk;
    blk.nv = nv;
    blk.nfilt = nfilt;
    for (int32_t j = 0; j < lanes(blk); ++j) blk.filters[j] = filters[j < nfilt ? j : 0];
    for (int64_t t = 0; t < kh_ * kw_; ++t)
      if (taps_bits >> t & 1) blk.taps.push_back(int32_t(t));
    blk.contiguous = true;  // (a partial block stores its live lanes with a mask)
    for (int32_t j = 1; j < nfilt && blk.contiguous; ++j) blk.contiguous = filters[j] == filters[0] + j;
    blocks_.push_back(blk);
  }

  int64_t c_out_, c_in_, kh_, kw_;
  bool avx512_;
  std::vector<NhwcBlock> blocks_;
  bool gathered_ = false;          // some block is not on consecutive channels
  std::vector<NhwcBlock> vblocks_;  // blocks_ writing lanes vlanes_-wide pixels of a scratch image
  int64_t vlanes_ = 0;
  std::vector<int32_t> vpos_;       // lane of each output channel (-1: empty filter), padded to 16
  std::vector<int32_t> empty_;
  std::unique_ptr<float[], FreeDeleter> packed_;
};

const PackedPatternConvNhwc* nhwc_conv_from_python(pybind11::handle obj) {
  return obj.cast<const PackedPatternConvNhwc*>();
}

void nhwc_conv_forward(const PackedPatternConvNhwc& conv, const float* x, const float* bias, float* out, int64_t n,
                       int64_t h, int64_t w, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                       int threads, const float* residual, bool relu, float clamp_max) {
  conv.forward(x, bias, out, n, h, w, sh, sw, ph, pw, dh, dw, threads, residual, relu, false, clamp_max);
}

NhwcConvShape nhwc_conv_shape(const PackedPatternConvNhwc& conv) { return conv.shape(); }

void register_pattern_conv_nhwc(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<PackedPatternConvNhwc>(m, "PackedPatternConvNhwc",
                                    "Weights of one pattern-sparse conv (groups=1) packed for channels-last input")
      .def(py::init([](uintptr_t weight, uintptr_t tap_mask, int64_t c_out, int64_t c_in, int64_t kh, int64_t kw) {
             return new PackedPatternConvNhwc(reinterpret_cast<const float*>(weight),
                                              reinterpret_cast<const uint8_t*>(tap_mask), c_out, c_in, kh, kw);
           }),
           py::arg("weight_ptr"), py::arg("tap_mask_ptr"), py::arg("c_out"), py::arg("c_in"), py::arg("kh"),
           py::arg("kw"), py::call_guard<py::gil_scoped_release>())
      .def(
          "forward",
          [](const PackedPatternConvNhwc& self, uintptr_t x, uintptr_t bias, uintptr_t out, int64_t n, int64_t h,
             int64_t w, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int threads,
             uintptr_t residual, bool relu, bool force_generic) {
            self.forward(reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(bias),
                         reinterpret_cast<float*>(out), n, h, w, sh, sw, ph, pw, dh, dw, threads,
                         reinterpret_cast<const float*>(residual), relu, force_generic);
          },
          py::arg("x_ptr"), py::arg("bias_ptr"), py::arg("out_ptr"), py::arg("n"), py::arg("h"), py::arg("w"),
          py::arg("stride_h"), py::arg("stride_w"), py::arg("pad_h"), py::arg("pad_w"), py::arg("dil_h"),
          py::arg("dil_w"), py::arg("num_threads"), py::arg("residual_ptr") = 0, py::arg("relu") = false,
          py::arg("force_generic") = false, py::call_guard<py::gil_scoped_release>(),
          "out = conv(x) + bias (+ residual) (ReLU), all (N, H, W, C) contiguous")
      .def_property_readonly("num_blocks", &PackedPatternConvNhwc::num_blocks)
      .def_property_readonly("contiguous_blocks", &PackedPatternConvNhwc::contiguous_blocks)
      .def_property_readonly("split_blocks", &PackedPatternConvNhwc::split_blocks,
                             "16-lane blocks whose two halves keep different taps, each half's own taps on 8 lanes")
      .def_property_readonly("filter_order", &PackedPatternConvNhwc::filter_order,
                             "every filter once, block by block, empty filters last")
      .def_property_readonly("executed_macs_per_pixel", &PackedPatternConvNhwc::executed_macs_per_pixel);
}

}  // namespace autosculpt
