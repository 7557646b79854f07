// PackedPatternConv's forward paths: the gather path (forward_group), the gather-free stride-1
// path (forward_group_direct), depthwise convs and filters with an empty mask; the fused epilogue.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>

#include "cpu/conv_gather.h"
#include "cpu/conv_microkernels.h"
#include "cpu/pattern_conv.h"

namespace autosculpt {

namespace {

constexpr int64_t kChunkTilesPerThread = 4;  // tiles gathered per chunk in shared mode (<= 64 / threads)
constexpr int64_t kPackChannelBlock = 64;  // channels per gather work item
// The gather-free stride-1 path pays where gathering costs most relative to the multiply-adds: few
// input channels (the gathered tile holds slots x C_in floats per pixel for C_out x taps x C_in
// multiply-adds, and with few channels the padded image stays in L1) and several tap slots. Measured
// on AVX-512 (bench/NOTES.md): 16-channel CIFAR layers gain 1.3-1.6x, while 64-512-channel layers and
// single-tap masks run 10-40% slower than with the gather.
constexpr int64_t kDirectMinWidth = 12;    // output width from which the (kw-1) dropped columns are cheap
constexpr int64_t kDirectMaxChannels = 24;  // input channels per group up to which the direct path is used
constexpr int64_t kDirectMinSlots = 2;     // distinct kept taps (over all filters) from which it is used
// ... and up to 48 channels when (nearly) every tap is gathered: 32 channels, 16x16, batch 8, five
// PAPER6 patterns (9 slots): 237 -> 206 us; with two patterns (5 slots) the gather stays faster.
constexpr int64_t kDirectMaxChannelsManySlots = 48;
constexpr int64_t kDirectManySlots = 7;

int64_t out_size(int64_t in, int64_t k, int64_t stride, int64_t pad, int64_t dil) {
  return (in + 2 * pad - dil * (k - 1) - 1) / stride + 1;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Scratch for the gathered input tiles, owned by the calling thread and reused across calls (so a
// call allocates nothing once warm). Concurrent forward() calls from different threads get their own.
template <int Which = 0>
float* col_scratch(size_t floats) {
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  thread_local std::unique_ptr<float, Free> buf;
  thread_local size_t cap = 0;
  if (floats > cap) {
    buf.reset();
    const size_t bytes = ((floats * sizeof(float) + 63) / 64) * 64;
    float* p = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (!p) throw std::bad_alloc();
    buf.reset(p);
    cap = floats;
  }
  return buf.get();
}

// Contiguous share [lo, hi) of `total` items for thread `tid` of `nthreads`.
inline void split_even(int64_t total, int tid, int nthreads, int64_t& lo, int64_t& hi) {
  lo = total * tid / nthreads;
  hi = total * (tid + 1) / nthreads;
}

}  // namespace

void ConvEpilogue::apply(float* o, int64_t at, int64_t len) const {
  if (active()) store(o, o, at, len);  // element-wise: in place is safe
}

namespace {

// dst[0 .. len) = act(src + r) (r may be null). Short rows, many calls: inline loops, not memcpy; a
// branch-free ReLU (std::max through a reference defeated vectorisation of the ReLU-only case) that
// keeps NaN, as torch.relu does.
inline void store_row(float* dst, const float* src, const float* r, int64_t len, bool relu) {
  if (r) {
    if (relu) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const float v = src[i] + r[i];
        dst[i] = v < 0.f ? 0.f : v;  // NaN stays NaN, as torch.relu
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) dst[i] = src[i] + r[i];
    }
  } else if (relu) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const float v = src[i];
      dst[i] = v < 0.f ? 0.f : v;  // NaN stays NaN, as torch.relu
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) dst[i] = src[i];
  }
}

// One zero-padded channel plane (Hp x Wp) from an h x w one.
inline void pad_plane(float* dst, const float* src, int64_t h, int64_t w, int64_t ph, int64_t pw, int64_t Wp,
                      int64_t plane) {
  const int64_t top = ph * Wp, bottom = (ph + h) * Wp;
#pragma omp simd
  for (int64_t i = 0; i < top; ++i) dst[i] = 0.f;
  for (int64_t y = 0; y < h; ++y) {
    float* row = dst + (ph + y) * Wp;
    const float* s = src + y * w;
    for (int64_t x = 0; x < pw; ++x) row[x] = 0.f;
#pragma omp simd
    for (int64_t x = 0; x < w; ++x) row[pw + x] = s[x];
    for (int64_t x = pw + w; x < Wp; ++x) row[x] = 0.f;
  }
#pragma omp simd
  for (int64_t i = bottom; i < plane; ++i) dst[i] = 0.f;
}

#ifdef AUTOSCULPT_X86
__attribute__((target("avx512f,avx512vl,avx2,fma"))) void store_row_avx512(float* dst, const float* src,
                                                                         const float* r, int64_t len, bool relu) {
  store_row(dst, src, r, len, relu);
}
__attribute__((target("avx512f,avx512vl,avx2,fma"))) void pad_plane_avx512(float* dst, const float* src, int64_t h,
                                                                         int64_t w, int64_t ph, int64_t pw,
                                                                         int64_t Wp, int64_t plane) {
  pad_plane(dst, src, h, w, ph, pw, Wp, plane);
}
#endif

}  // namespace

void ConvEpilogue::store(float* dst, const float* src, int64_t at, int64_t len) const {
  const float* r = residual ? residual + at : nullptr;
#ifdef AUTOSCULPT_X86
  if (wide) return store_row_avx512(dst, src, r, len, relu);
#endif
  store_row(dst, src, r, len, relu);
}

void PackedPatternConv::forward(const ConvForwardArgs& args) const {
  const int64_t n = args.n, h = args.h, w = args.w, sh = args.stride_h, sw = args.stride_w;
  const int64_t ph = args.pad_h, pw = args.pad_w, dh = args.dil_h, dw = args.dil_w;
  if (n <= 0 || h <= 0 || w <= 0 || sh <= 0 || sw <= 0 || ph < 0 || pw < 0 || dh <= 0 || dw <= 0)
    throw std::invalid_argument("PackedPatternConv.forward: bad sizes");
  const int64_t oh = out_size(h, kh_, sh, ph, dh), ow = out_size(w, kw_, sw, pw, dw);
  if (oh <= 0 || ow <= 0) throw std::invalid_argument("PackedPatternConv.forward: empty output");
  ConvForwardArgs a = args;
  if (a.num_threads <= 0) a.num_threads = omp_get_max_threads();
  if (depthwise_) {
    forward_depthwise(a, oh, ow);
    return;
  }
  const bool direct = uses_direct(ow, sh, sw);
  a.epilogue.wide = (isa_ == Isa::kAvx512);
  for (int64_t g = 0; g < groups_; ++g) {
    if (direct)
      forward_group_direct(g, a, oh, ow);
    else
      forward_group(g, a, oh, ow);
  }
}

// Filters with an empty mask: output = epilogue(bias). Thread `tid` of `T` takes its share.
void PackedPatternConv::fill_empty_filters(const ConvGroupPlan& pl, const float* bias, float* out, int64_t n,
                                           int64_t P, const ConvEpilogue& epi, int tid, int T) const {
  const int64_t n_empty = int64_t(pl.empty_filters.size());
  int64_t lo, hi;
  split_even(n * n_empty, tid, T, lo, hi);
  for (int64_t i = lo; i < hi; ++i) {
    const int64_t b = i / n_empty, co = pl.empty_filters[size_t(i % n_empty)], at = (b * c_out_ + co) * P;
    std::fill(out + at, out + at + P, bias ? bias[co] : 0.f);
    epi.apply(out + at, at, P);
  }
}

bool PackedPatternConv::uses_direct(int64_t out_w, int64_t sh, int64_t sw) const {
  if (depthwise_ || sh != 1 || sw != 1 || direct_mode_ == 0) return false;
  if (direct_mode_ == 1) return true;
  // The direct path also computes the (kw - 1) * dilation padding columns of every row and drops
  // them: worth it once rows are wide enough that this waste costs less than the gather it saves
  // (and see kDirectMaxChannels).
  const int64_t slots = plans_.empty() ? 0 : int64_t(plans_[0].slot_taps.size());
  if (out_w < kDirectMinWidth || slots < kDirectMinSlots) return false;
  return c_in_pg_ <= kDirectMaxChannels || (c_in_pg_ <= kDirectMaxChannelsManySlots && slots >= kDirectManySlots);
}

// Gather-free stride-1 convolution. Each image is copied once into a zero-padded buffer with row
// pitch Wp = w + 2 * pw. In that layout the input of tap (r, s) for output position q = y * Wp + x is
// padded[q + r * dh * Wp + s * dw]: a constant offset per tap, so the micro-kernels read their pixel
// vectors straight from the padded image (tap_off = those offsets, ldb = one channel plane) instead of
// from a gathered tile. Positions with x >= ow (the pitch's padding columns) are computed into a
// staging buffer and dropped when the rows are copied out (with the bias already added and the
// epilogue applied). Threads pad a share of the (image, channel) planes, meet at a barrier, then each
// computes its own range of 96-position panel pairs for all filter blocks.
void PackedPatternConv::forward_group_direct(int64_t g, const ConvForwardArgs& args, int64_t oh, int64_t ow) const {
  const float *x = args.x, *bias = args.bias;
  float* out = args.out;
  const int64_t n = args.n, h = args.h, w = args.w, ph = args.pad_h, pw = args.pad_w, dh = args.dil_h,
                dw = args.dil_w;
  int threads = args.num_threads;
  const ConvEpilogue& epi = args.epilogue;
  const ConvGroupPlan& pl = plans_[size_t(g)];
  const int64_t P = oh * ow, cpg = c_in_pg_, c_in = c_in_pg_ * groups_;
  const int64_t Hp = h + 2 * ph, Wp = w + 2 * pw, plane = Hp * Wp;
  const int64_t W = lanes_, SW = int64_t(lanes_) * nv_max_, PAIR = 2 * SW;
  const int64_t Q = (oh - 1) * Wp + ow;                  // positions up to the last valid output
  const int64_t panels = ceil_div(Q, PAIR);              // panel pairs per image
  const int64_t nblocks = int64_t(pl.blocks.size()), n_empty = int64_t(pl.empty_filters.size());
  const int64_t total_cost = nblocks ? pl.block_cost_prefix.back() : 0;
  // Lanes past Q read up to PAIR + the largest tap offset beyond the last plane: zeroed slack.
  const int64_t slack = PAIR + (kh_ - 1) * dh * Wp + (kw_ - 1) * dw + 16;
  const int64_t img_floats = cpg * plane;
  const double work = double(n * P) * double(total_cost) + double(n * n_empty * P);
  threads = int(std::clamp<double>(work / min_work_per_thread_, 1.0, double(threads)));
  float* padded = nblocks ? col_scratch<1>(size_t(n * img_floats + slack)) : nullptr;
  // per pattern group: its taps' offsets in the padded layout
  std::vector<std::vector<int64_t>> offs(pl.groups.size());
  for (size_t gi = 0; gi < pl.groups.size(); ++gi)
    for (int32_t t : pl.groups[gi].taps) offs[gi].push_back((t / kw_) * dh * Wp + (t % kw_) * dw);
  const float* xg = x + g * cpg * h * w;

#pragma omp parallel num_threads(threads)
  {
    const int T = omp_get_num_threads(), tid = omp_get_thread_num();
    int64_t lo, hi;
    fill_empty_filters(pl, bias, out, n, P, epi, tid, T);
    if (nblocks) {
      // 1. pad: (image, channel) planes
      split_even(n * cpg, tid, T, lo, hi);
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t b = i / cpg, c = i % cpg;
        const float* src = xg + (b * c_in + c) * h * w;
        float* dst = padded + b * img_floats + c * plane;
#ifdef AUTOSCULPT_X86
        if (epi.wide) {
          pad_plane_avx512(dst, src, h, w, ph, pw, Wp, plane);
          continue;
        }
#endif
        pad_plane(dst, src, h, w, ph, pw, Wp, plane);
      }
      if (tid == T - 1) std::fill(padded + n * img_floats, padded + n * img_floats + slack, 0.f);
#pragma omp barrier
      // 2. compute: panel pairs of all images, split evenly
      alignas(64) float tmp[16 * 2 * 48];
      float* rows[16];
      float bvals[16];
      struct RowSeg {
        int64_t out_off, tmp_off, len;
      };
      std::vector<RowSeg> segs(size_t(PAIR / Wp + 2));  // rows a panel pair can touch
      split_even(n * panels, tid, T, lo, hi);
      for (int64_t item = lo; item < hi; ++item) {
        const int64_t b = item / panels, q0 = (item % panels) * PAIR, valid = std::min(PAIR, Q - q0);
        const float* src = padded + b * img_floats + q0;
        // the panel's valid output columns, row by row (the same for every filter)
        int nseg = 0;
        for (int64_t q = q0; q < q0 + valid;) {
          const int64_t y = q / Wp, x0 = q % Wp, x1 = std::min(Wp, x0 + (q0 + valid - q));
          if (x0 < ow) segs[nseg++] = RowSeg{y * ow + x0, q - q0, std::min(x1, ow) - x0};
          q += x1 - x0;
        }
        for (const FilterBlock& blk : pl.blocks) {
          const PatternGroup& grp = pl.groups[size_t(blk.group)];
          const float* wp = packed_.data() + blk.a_offset;
          const int64_t nt = int64_t(grp.taps.size());
          const int64_t* to = offs[size_t(blk.group)].data();
          for (int m = 0; m < blk.mr; ++m) bvals[m] = bias ? bias[blk.filters[m]] : 0.f;
          if (blk.mr <= mr2_max_ && valid > SW) {
            for (int m = 0; m < blk.mr; ++m) rows[m] = tmp + m * PAIR;
            kernels2_[blk.mr - 1](nt, to, cpg, plane, wp, src, SW, rows, bvals);
          } else {
            for (int64_t s0 = 0; s0 < valid; s0 += SW) {
              const int64_t nv = ceil_div(std::min(SW, valid - s0), W);
              for (int m = 0; m < blk.mr; ++m) rows[m] = tmp + m * PAIR + s0;
              kernels_[(blk.mr - 1) * nv_max_ + (nv - 1)](nt, to, cpg, plane, wp, src + s0, rows, bvals);
            }
          }
          // copy the valid columns out, applying the epilogue on the way
          for (int m = 0; m < blk.mr; ++m) {
            const int64_t base = (b * c_out_ + blk.filters[m]) * P;
            for (int si = 0; si < nseg; ++si)
              epi.store(out + base + segs[si].out_off, tmp + m * PAIR + segs[si].tmp_off, base + segs[si].out_off,
                        segs[si].len);
          }
        }
      }
    }
  }
}

void PackedPatternConv::forward_depthwise(const ConvForwardArgs& args, int64_t oh, int64_t ow) const {
  const float *x = args.x, *bias = args.bias;
  float* out = args.out;
  const int64_t n = args.n, h = args.h, w = args.w, ph = args.pad_h, pw = args.pad_w, dh = args.dil_h,
                dw = args.dil_w;
  const int64_t sh = args.stride_h, sw = args.stride_w;
  const int threads = args.num_threads;
  const ConvEpilogue& epi = args.epilogue;
  const int64_t P = oh * ow, taps_n = kh_ * kw_;
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
  for (int64_t b = 0; b < n; ++b)
    for (int64_t c = 0; c < c_out_; ++c) {
      const float* xi = x + (b * c_out_ + c) * h * w;
      float* o = out + (b * c_out_ + c) * P;
      const float bv = bias ? bias[c] : 0.f;
      for (int64_t p = 0; p < P; ++p) o[p] = bv;
      for (int32_t t : dw_taps_[c]) {
        const float wv = dw_weight_[c * taps_n + t];
        const int64_t r = t / kw_, s = t % kw_;
        // output columns whose input column xx*sw + off lies inside the image
        const int64_t off = s * dw - pw;
        const int64_t xl = off >= 0 ? 0 : ceil_div(-off, sw);
        const int64_t xr = (w - 1 - off) < 0 ? 0 : std::min(ow, (w - 1 - off) / sw + 1);
        if (xl >= xr) continue;
        for (int64_t y = 0; y < oh; ++y) {
          const int64_t iy = y * sh - ph + r * dh;
          if (iy < 0 || iy >= h) continue;
          float* orow = o + y * ow;
          const float* src = xi + iy * w + off;
          if (sw == 1) {
#pragma omp simd
            for (int64_t xx = xl; xx < xr; ++xx) orow[xx] += wv * src[xx];
          } else {
            for (int64_t xx = xl; xx < xr; ++xx) orow[xx] += wv * src[xx * sw];
          }
        }
      }
      if (epi.active()) epi.apply(o, (b * c_out_ + c) * P, P);
    }
}

// Everything one forward() of one conv group needs, shared by its helpers.
struct PackedPatternConv::GroupCall {
  const ConvGroupPlan* pl;
  const float* x;     // input of image 0, channel 0 of this conv group
  const float* bias;  // may be null
  float* out;
  int64_t n, h, w, oh, ow, P, G, sh, sw, ph, pw, dh, dw, c_in;
  int64_t slots, NT, SW, W, tile_floats, sub_floats;
  GatherFn gather;
  ConvEpilogue epi;
};

// Gathers channels [c0, c1) of one tap slot for output pixels [g0, g0 + valid) into a tile block.
void PackedPatternConv::gather_tile(const GroupCall& a, int64_t g0, int64_t valid, int64_t slot, int64_t c0,
                                    int64_t c1, float* colt, std::vector<GatherSeg>& segs) const {
  const int64_t tap = a.pl->slot_taps[size_t(slot)], r = tap / kw_, s = tap % kw_;
  const int64_t off = s * a.dw - a.pw;  // input column = output column * sw + off
  const int64_t xl_img = off >= 0 ? 0 : ceil_div(-off, a.sw);
  const int64_t xr_img = (a.w - 1 - off) < 0 ? 0 : (a.w - 1 - off) / a.sw + 1;
  const int64_t SW = a.SW, slot_off = slot * c_in_pg_ * SW;
  segs.clear();
  int64_t i = 0;
  while (i < valid) {
    const int64_t gp = g0 + i, b = gp / a.P, p = gp % a.P, y = p / a.ow, x0 = p % a.ow;
    const int64_t len = std::min({a.ow - x0, valid - i, int64_t(16), SW - i % SW});
    const int64_t iy = y * a.sh - a.ph + r * a.dh;
    GatherSeg sg{};
    if (iy >= 0 && iy < a.h) {
      const int64_t vl = std::clamp<int64_t>(xl_img - x0, 0, len), vh = std::clamp<int64_t>(xr_img - x0, 0, len);
      if (vh > vl) sg.valid = ((1u << vh) - 1u) & ~((1u << vl) - 1u);
    }
    sg.src = b * a.c_in * a.h * a.w + iy * a.w + x0 * a.sw + off;
    sg.dst = (i / SW) * a.sub_floats + slot_off + i % SW;
    sg.len = int32_t(len);
    for (int k = 0; k < 8; ++k) {
      sg.lo |= ((sg.valid >> k) & 1u) << (2 * k);
      sg.hi |= ((sg.valid >> (k + 8)) & 1u) << (2 * k);
    }
    segs.push_back(sg);
    i += len;
  }
  // Lanes past the last pixel (up to the micro-kernel's vector width) are computed and dropped;
  // zeros keep them cheap (no denormals).
  const int64_t end = ceil_div(valid, a.W) * a.W;
  while (i < end) {
    GatherSeg sg{};
    sg.len = int32_t(std::min({end - i, int64_t(16), SW - i % SW}));
    sg.dst = (i / SW) * a.sub_floats + slot_off + i % SW;
    segs.push_back(sg);
    i += sg.len;
  }
  a.gather(segs.data(), int64_t(segs.size()), a.x, a.h * a.w, colt, SW, c0, c1, a.sw);
}

// One filter block over the gathered pixels [g0, g0 + valid): one micro-kernel call per sub-tile.
void PackedPatternConv::compute_block(const GroupCall& a, int64_t g0, int64_t valid, const FilterBlock& blk,
                                      const float* colt, float* tmp) const {
  const PatternGroup& grp = a.pl->groups[size_t(blk.group)];
  const float* wp = packed_.data() + blk.a_offset;
  const ConvMicroKernel* row = kernels_ + (blk.mr - 1) * nv_max_;
  float* rows[16];
  float bvals[16];
  for (int m = 0; m < blk.mr; ++m) bvals[m] = a.bias ? a.bias[blk.filters[m]] : 0.f;
  const int64_t SW = a.SW, P = a.P;
  for (int64_t s0 = 0; s0 < valid; s0 += SW) {
    const int64_t gs = g0 + s0, vs = std::min(SW, valid - s0);
    if (blk.mr <= mr2_max_ && valid - s0 >= 2 * SW && (gs % P) + 2 * SW <= P) {
      // two full panels of one image: one call with twice the accumulators
      const int64_t b = gs / P, p = gs % P;
      for (int m = 0; m < blk.mr; ++m) rows[m] = a.out + (b * c_out_ + blk.filters[m]) * P + p;
      kernels2_[blk.mr - 1](int64_t(grp.taps.size()), grp.tap_off.data(), c_in_pg_, SW, wp,
                            colt + (s0 / SW) * a.sub_floats, a.sub_floats, rows, bvals);
      if (a.epi.active())
        for (int m = 0; m < blk.mr; ++m) a.epi.apply(rows[m], rows[m] - a.out, 2 * SW);
      s0 += SW;
      continue;
    }
    const int64_t nv = ceil_div(vs, a.W);
    const int64_t b = gs / P, p = gs % P;
    const bool direct = (vs == nv * a.W) && (p + vs <= P);
    if (direct) {
      for (int m = 0; m < blk.mr; ++m) rows[m] = a.out + (b * c_out_ + blk.filters[m]) * P + p;
    } else {
      for (int m = 0; m < blk.mr; ++m) rows[m] = tmp + m * SW;
    }
    row[nv - 1](int64_t(grp.taps.size()), grp.tap_off.data(), c_in_pg_, SW, wp, colt + (s0 / SW) * a.sub_floats,
                rows, bvals);
    if (direct && a.epi.active())
      for (int m = 0; m < blk.mr; ++m) a.epi.apply(rows[m], rows[m] - a.out, vs);
    if (!direct) {  // scatter the valid lanes, which may span two or more images
      int64_t j = 0;
      while (j < vs) {
        const int64_t gj = gs + j, bj = gj / P, pj = gj % P, len = std::min(vs - j, P - pj);
        for (int m = 0; m < blk.mr; ++m) {
          const int64_t at = (bj * c_out_ + blk.filters[m]) * P + pj;
          std::memcpy(a.out + at, tmp + m * SW + j, size_t(len) * sizeof(float));
          if (a.epi.active()) a.epi.apply(a.out + at, at, len);
        }
        j += len;
      }
    }
  }
}

void PackedPatternConv::forward_group(int64_t g, const ConvForwardArgs& args, int64_t oh, int64_t ow) const {
  const float *x = args.x, *bias = args.bias;
  float* out = args.out;
  const int64_t n = args.n, h = args.h, w = args.w, ph = args.pad_h, pw = args.pad_w, dh = args.dil_h,
                dw = args.dil_w;
  const int64_t sh = args.stride_h, sw = args.stride_w;
  int threads = args.num_threads;
  const ConvEpilogue& epi = args.epilogue;
  const ConvGroupPlan& pl = plans_[size_t(g)];
  GroupCall a{};
  a.pl = &pl;
  a.x = x + g * c_in_pg_ * h * w;
  a.bias = bias, a.out = out;
  a.n = n, a.h = h, a.w = w, a.oh = oh, a.ow = ow, a.P = oh * ow, a.G = n * a.P;
  a.sh = sh, a.sw = sw, a.ph = ph, a.pw = pw, a.dh = dh, a.dw = dw, a.c_in = c_in_pg_ * groups_;
  a.slots = int64_t(pl.slot_taps.size());
  a.NT = pl.tile, a.W = lanes_, a.SW = int64_t(lanes_) * nv_max_;
  a.tile_floats = a.slots * c_in_pg_ * a.NT, a.sub_floats = a.slots * c_in_pg_ * a.SW;
  a.gather = &gather_generic;
  a.epi = epi;
#ifdef AUTOSCULPT_X86
  // Stride-1/2 gathers use masked AVX-512 loads when the CPU has them.
  if (isa_ == Isa::kAvx512 && sw <= 2) a.gather = &gather_avx512;
  if (isa_ == Isa::kAvx2 && sw == 1) a.gather = &gather_avx2;
#endif
  const int64_t G = a.G, P = a.P, NT = a.NT, SW = a.SW, cpg = c_in_pg_;
  const int64_t nblocks = int64_t(pl.blocks.size());
  const int64_t n_empty = int64_t(pl.empty_filters.size());
  const int64_t total_cost = nblocks ? pl.block_cost_prefix.back() : 0;

  // Threads: no more than the work pays for (a parallel region costs microseconds).
  const double work = double(G) * double(total_cost) + double(n * n_empty * P);
  threads = int(std::clamp<double>(work / min_work_per_thread_, 1.0, double(threads)));
  const int64_t subtiles = nblocks ? ceil_div(G, SW) : 0;
  // Enough sub-tiles: every thread gathers and computes its own pixels, no barrier. Otherwise (small
  // images at small batch) threads share gathered tiles and split the filters instead.
  const bool private_tiles = subtiles >= int64_t(threads) * min_subtiles_per_thread_ || threads == 1;
  const int64_t tiles_total = nblocks ? ceil_div(G, NT) : 0;
  const int64_t chunk_tiles = std::min<int64_t>({tiles_total, int64_t(threads) * kChunkTilesPerThread, 64});
  const int64_t chunks = chunk_tiles ? ceil_div(tiles_total, chunk_tiles) : 0;
  float* shared_col = (nblocks && !private_tiles) ? col_scratch(size_t(chunk_tiles * a.tile_floats)) : nullptr;
  const int64_t cblocks = ceil_div(cpg, kPackChannelBlock);

#pragma omp parallel num_threads(threads)
  {
    const int T = omp_get_num_threads(), tid = omp_get_thread_num();
    int64_t lo, hi;
    fill_empty_filters(pl, bias, out, n, P, epi, tid, T);
    std::vector<GatherSeg> segs;
    segs.reserve(size_t(NT + 64));
    alignas(64) float tmp[16 * 48];  // partial sub-tiles: MR x SW staging

    if (private_tiles && nblocks) {
      float* col = col_scratch(size_t(a.tile_floats));  // this thread's own, reused across calls
      split_even(subtiles, tid, T, lo, hi);
      for (int64_t st = lo; st < hi; st += NT / SW) {
        const int64_t g0 = st * SW, valid = std::min({NT, (hi - st) * SW, G - g0});
        for (int64_t slot = 0; slot < a.slots; ++slot) gather_tile(a, g0, valid, slot, 0, cpg, col, segs);
        // sub-tile outer, filter blocks inner: one sub-tile's gathered pixels stay in L1 while all
        // filter blocks use them; the (smaller) weight panels stream from L2.
        for (int64_t s0 = 0; s0 < valid; s0 += 2 * SW) {  // pairs: small blocks take both at once
          const int64_t vs = std::min(2 * SW, valid - s0);
          for (const FilterBlock& blk : pl.blocks)
            compute_block(a, g0 + s0, vs, blk, col + (s0 / SW) * a.sub_floats, tmp);
        }
      }
    } else if (nblocks) {
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const int64_t t0 = chunk * chunk_tiles, tc = std::min(chunk_tiles, tiles_total - t0);
        // gather: (tile, slot, channel block) items
        split_even(tc * a.slots * cblocks, tid, T, lo, hi);
        for (int64_t item = lo; item < hi; ++item) {
          const int64_t tl = item / (a.slots * cblocks), rem = item % (a.slots * cblocks);
          const int64_t slot = rem / cblocks, cb = rem % cblocks;
          const int64_t c0 = cb * kPackChannelBlock, c1 = std::min(cpg, c0 + kPackChannelBlock);
          const int64_t g0 = (t0 + tl) * NT;
          gather_tile(a, g0, std::min(NT, G - g0), slot, c0, c1, shared_col + tl * a.tile_floats, segs);
        }
#pragma omp barrier
        // compute: (tile, filter block) items, split between threads by estimated work (block cost
        // times the tile's vectors: the last tile of the batch may be nearly empty)
        int64_t tile_w[64];
        int64_t cost_all = 0;
        for (int64_t t = 0; t < tc; ++t) {
          tile_w[t] = ceil_div(std::min(NT, G - (t0 + t) * NT), a.W);
          cost_all += tile_w[t] * total_cost;
        }
        auto first_item = [&](int64_t c) -> int64_t {  // first item whose cost range starts at or after c
          int64_t t = 0;
          while (t < tc && c >= tile_w[t] * total_cost) c -= tile_w[t++] * total_cost;
          if (t == tc) return tc * nblocks;
          const int64_t rc = ceil_div(c, tile_w[t]);
          const int64_t j = std::lower_bound(pl.block_cost_prefix.begin(), pl.block_cost_prefix.end() - 1, rc) -
                            pl.block_cost_prefix.begin();
          return t * nblocks + j;
        };
        const int64_t ilo = first_item(cost_all * tid / T);
        const int64_t ihi = (tid + 1 == T) ? tc * nblocks : first_item(cost_all * (tid + 1) / T);
        for (int64_t item = ilo; item < ihi; ++item) {
          const int64_t tl = item / nblocks, g0 = (t0 + tl) * NT;
          compute_block(a, g0, std::min(NT, G - g0), pl.blocks[size_t(item % nblocks)],
                        shared_col + tl * a.tile_floats, tmp);
        }
#pragma omp barrier
      }
    }
  }
}

namespace {

// Whether x[0, n) holds a NaN or +-inf: an all-ones exponent. Integer ORs vectorise without any
// reordering question (the float version, a strict sum, ran scalar: 16 us for 16K values).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "arch=haswell", "default")))
#endif
bool any_nonfinite(const float* x, int64_t n) {
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(x);
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= uint32_t((bits[i] & 0x7f800000u) == 0x7f800000u);
  return bad != 0;
}

}  // namespace

// True when no element of x[0, n) is NaN or +-inf. Screens a conv input cheaply (one read) before
// the NaN propagation that dropped taps need (see ops/conv.py); large inputs are split over threads.
bool all_finite(const float* x, int64_t n, int num_threads) {
  if (num_threads <= 0) num_threads = omp_get_max_threads();
  constexpr int64_t kChunk = int64_t(1) << 18;
  if (n < 2 * kChunk || num_threads == 1) return !any_nonfinite(x, n);
  bool bad = false;
#pragma omp parallel for num_threads(num_threads) reduction(|| : bad) schedule(static)
  for (int64_t c = 0; c < n; c += kChunk) bad = bad || any_nonfinite(x + c, std::min(kChunk, n - c));
  return !bad;
}

}  // namespace autosculpt
