#include "cpu/pattern_conv.h"

#include <omp.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <stdexcept>

#include "cpu/conv_gather.h"
#include "cpu/conv_microkernels.h"
#include "registry.h"

namespace autosculpt {

namespace {

// A pixel tile's gathered input should stay in the core's L2 while every filter block reads it.
constexpr int64_t kTileBytes = 384 * 1024;
constexpr int64_t kMaxTileSubtiles = 8;   // at most 8 micro-kernel widths per tile
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

bool cpu_has(ConvIsa isa) {
#ifdef AUTOSCULPT_X86
  __builtin_cpu_init();
  switch (isa) {
    case ConvIsa::kAvx512:
      return __builtin_cpu_supports("avx512f");
    case ConvIsa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    default:
      return true;
  }
#else
  return isa == ConvIsa::kGeneric;
#endif
}

ConvIsa pick_isa(const std::string& name) {
  if (name.empty()) {
    if (cpu_has(ConvIsa::kAvx512)) return ConvIsa::kAvx512;
    if (cpu_has(ConvIsa::kAvx2)) return ConvIsa::kAvx2;
    return ConvIsa::kGeneric;
  }
  ConvIsa isa;
  if (name == "avx512")
    isa = ConvIsa::kAvx512;
  else if (name == "avx2")
    isa = ConvIsa::kAvx2;
  else if (name == "generic")
    isa = ConvIsa::kGeneric;
  else
    throw std::invalid_argument("isa: expected '', 'avx512', 'avx2' or 'generic', got '" + name + "'");
  if (!cpu_has(isa)) throw std::invalid_argument("isa: this CPU does not support '" + name + "'");
  return isa;
}

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

PackedPatternConv::PackedPatternConv(const float* weight, const uint8_t* tap_mask, int64_t c_out,
                                     int64_t c_in_pg, int64_t kh, int64_t kw, int64_t groups,
                                     const std::string& isa)
    : c_out_(c_out), c_in_pg_(c_in_pg), kh_(kh), kw_(kw), groups_(groups), isa_(pick_isa(isa)) {
  if (c_out <= 0 || c_in_pg <= 0 || kh <= 0 || kw <= 0 || groups <= 0 || c_out % groups != 0)
    throw std::invalid_argument("PackedPatternConv: bad sizes");
  const int64_t taps_n = kh * kw;
  depthwise_ = (groups > 1 && c_in_pg == 1 && c_out == groups);
  if (depthwise_) {
    dw_weight_.assign(weight, weight + c_out * taps_n);
    dw_taps_.resize(c_out);
    for (int64_t co = 0; co < c_out; ++co)
      for (int64_t t = 0; t < taps_n; ++t)
        if (tap_mask[co * taps_n + t]) dw_taps_[co].push_back(int32_t(t));
    return;
  }

  switch (isa_) {
#ifdef AUTOSCULPT_X86
    case ConvIsa::kAvx512:
      mr_ = ukernels::kAvx512MR, lanes_ = ukernels::kAvx512Lanes, nv_max_ = ukernels::kAvx512NV;
      kernels_ = ukernels::avx512_table();
      kernels2_ = ukernels::avx512_table_2panels(), mr2_max_ = ukernels::kAvx512MR2;
      break;
    case ConvIsa::kAvx2:
      mr_ = ukernels::kAvx2MR, lanes_ = ukernels::kAvx2Lanes, nv_max_ = ukernels::kAvx2NV;
      kernels_ = ukernels::avx2_table();
      break;
#endif
    default:
      mr_ = ukernels::kGenericMR, lanes_ = ukernels::kGenericLanes, nv_max_ = ukernels::kGenericNV;
      kernels_ = ukernels::generic_table();
  }
  const int64_t sub = int64_t(lanes_) * nv_max_;

  const int64_t c_out_pg = c_out / groups;
  plans_.resize(groups);
  // First pass: group filters by mask, find the taps used, count packed floats.
  int64_t packed_floats = 0;
  for (int64_t g = 0; g < groups; ++g) {
    ConvGroupPlan& pl = plans_[g];
    std::map<std::vector<int32_t>, int> index;
    std::vector<bool> used(taps_n, false);
    for (int64_t f = 0; f < c_out_pg; ++f) {
      const int64_t co = g * c_out_pg + f;
      std::vector<int32_t> taps;
      for (int64_t t = 0; t < taps_n; ++t)
        if (tap_mask[co * taps_n + t]) taps.push_back(int32_t(t)), used[t] = true;
      if (taps.empty()) {
        pl.empty_filters.push_back(int32_t(co));
        continue;
      }
      auto it = index.find(taps);
      if (it == index.end()) {
        it = index.emplace(taps, int(pl.groups.size())).first;
        pl.groups.push_back(PatternGroup{taps, {}, {}});
      }
      pl.groups[it->second].filters.push_back(int32_t(co));
    }
    std::vector<int64_t> slot_of(taps_n, -1);
    for (int64_t t = 0; t < taps_n; ++t)
      if (used[t]) slot_of[t] = int64_t(pl.slot_taps.size()), pl.slot_taps.push_back(int32_t(t));
    const int64_t slots = int64_t(pl.slot_taps.size());
    // Tile width: a whole number of micro-kernel widths whose gathered input fits kTileBytes.
    const int64_t per_pixel = std::max<int64_t>(1, slots * c_in_pg * int64_t(sizeof(float)));
    pl.tile = std::clamp<int64_t>((kTileBytes / per_pixel) / sub, 1, kMaxTileSubtiles) * sub;
    for (auto& grp : pl.groups) {
      for (int32_t t : grp.taps) grp.tap_off.push_back(slot_of[t] * c_in_pg * sub);
      packed_floats += int64_t(grp.filters.size()) * int64_t(grp.taps.size()) * c_in_pg;
    }
  }
  // Second pass: cut groups into blocks of mr_ filters and pack each block as a K x mr panel.
  packed_.resize(size_t(packed_floats));
  int64_t off = 0;
  for (int64_t g = 0; g < groups; ++g) {
    ConvGroupPlan& pl = plans_[g];
    for (size_t gi = 0; gi < pl.groups.size(); ++gi) {
      const PatternGroup& grp = pl.groups[gi];
      const int64_t nt = int64_t(grp.taps.size()), k = nt * c_in_pg, nf = int64_t(grp.filters.size());
      // Balance block sizes (e.g. 10 filters -> 5 + 5 rather than 8 + 2: small blocks run slower).
      const int64_t nblocks = ceil_div(nf, mr_);
      int64_t f0 = 0;
      for (int64_t bi = 0; bi < nblocks; ++bi) {
        const int64_t f1 = nf * (bi + 1) / nblocks;
        FilterBlock blk{};
        blk.group = int32_t(gi);
        blk.mr = int32_t(f1 - f0);
        blk.a_offset = off;
        // Small blocks issue more loads per FMA: charge them as if a little wider.
        blk.cost = k * (blk.mr + 2);
        for (int64_t i = 0; i < blk.mr; ++i) blk.filters[i] = grp.filters[size_t(f0 + i)];
        for (int64_t ti = 0; ti < nt; ++ti)
          for (int64_t ci = 0; ci < c_in_pg; ++ci)
            for (int64_t m = 0; m < blk.mr; ++m)
              packed_[size_t(off + (ti * c_in_pg + ci) * blk.mr + m)] =
                  weight[(int64_t(blk.filters[m]) * c_in_pg + ci) * taps_n + grp.taps[size_t(ti)]];
        off += k * blk.mr;
        pl.blocks.push_back(blk);
        f0 = f1;
      }
    }
    pl.block_cost_prefix.assign(1, 0);
    for (auto& blk : pl.blocks) pl.block_cost_prefix.push_back(pl.block_cost_prefix.back() + blk.cost);
  }
}

int64_t PackedPatternConv::kept_taps() const {
  int64_t total = 0;
  if (depthwise_) {
    for (auto& t : dw_taps_) total += int64_t(t.size());
    return total;
  }
  for (auto& pl : plans_)
    for (auto& grp : pl.groups) total += int64_t(grp.taps.size() * grp.filters.size());
  return total;
}

int64_t PackedPatternConv::num_pattern_groups() const {
  int64_t total = 0;
  for (auto& pl : plans_) total += int64_t(pl.groups.size());
  return total;
}

std::string PackedPatternConv::isa_name() const {
  switch (isa_) {
    case ConvIsa::kAvx512:
      return "avx512";
    case ConvIsa::kAvx2:
      return "avx2";
    default:
      return "generic";
  }
}

void PackedPatternConv::forward(const float* x, const float* bias, float* out, int64_t n, int64_t h, int64_t w,
                                int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                                int num_threads, const ConvEpilogue& epi) const {
  if (n <= 0 || h <= 0 || w <= 0 || sh <= 0 || sw <= 0 || ph < 0 || pw < 0 || dh <= 0 || dw <= 0)
    throw std::invalid_argument("PackedPatternConv.forward: bad sizes");
  const int64_t oh = out_size(h, kh_, sh, ph, dh), ow = out_size(w, kw_, sw, pw, dw);
  if (oh <= 0 || ow <= 0) throw std::invalid_argument("PackedPatternConv.forward: empty output");
  if (num_threads <= 0) num_threads = omp_get_max_threads();
  if (depthwise_) {
    forward_depthwise(x, bias, out, n, h, w, oh, ow, sh, sw, ph, pw, dh, dw, num_threads, epi);
    return;
  }
  const bool direct = uses_direct(ow, sh, sw);
  ConvEpilogue e = epi;
  e.wide = (isa_ == ConvIsa::kAvx512);
  for (int64_t g = 0; g < groups_; ++g) {
    if (direct)
      forward_group_direct(g, x, bias, out, n, h, w, oh, ow, ph, pw, dh, dw, num_threads, e);
    else
      forward_group(g, x, bias, out, n, h, w, oh, ow, sh, sw, ph, pw, dh, dw, num_threads, e);
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
void PackedPatternConv::forward_group_direct(int64_t g, const float* x, const float* bias, float* out, int64_t n,
                                             int64_t h, int64_t w, int64_t oh, int64_t ow, int64_t ph, int64_t pw,
                                             int64_t dh, int64_t dw, int threads, const ConvEpilogue& epi) const {
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

void PackedPatternConv::forward_depthwise(const float* x, const float* bias, float* out, int64_t n, int64_t h,
                                          int64_t w, int64_t oh, int64_t ow, int64_t sh, int64_t sw, int64_t ph,
                                          int64_t pw, int64_t dh, int64_t dw, int threads,
                                          const ConvEpilogue& epi) const {
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

void PackedPatternConv::forward_group(int64_t g, const float* x, const float* bias, float* out, int64_t n,
                                      int64_t h, int64_t w, int64_t oh, int64_t ow, int64_t sh, int64_t sw,
                                      int64_t ph, int64_t pw, int64_t dh, int64_t dw, int threads,
                                      const ConvEpilogue& epi) const {
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
  if (isa_ == ConvIsa::kAvx512 && sw <= 2) a.gather = &gather_avx512;
  if (isa_ == ConvIsa::kAvx2 && sw == 1) a.gather = &gather_avx2;
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

// True when no element of x[0, n) is NaN or +-inf: x * 0 is exactly +-0 for a finite x and NaN
// otherwise, so the sum is 0 exactly when all are finite. Screens a conv input cheaply (one read)
// before the NaN propagation that dropped taps need (see ops/conv.py).
bool all_finite(const float* x, int64_t n, int num_threads) {
  float acc = 0.f;
  if (num_threads <= 0) num_threads = omp_get_max_threads();
#pragma omp parallel for simd reduction(+ : acc) num_threads(num_threads) if (n >= (int64_t(1) << 18))
  for (int64_t i = 0; i < n; ++i) acc += x[i] * 0.0f;
  return acc == 0.0f;
}

void register_pattern_conv(pybind11::module_& m) {
  namespace py = pybind11;
  m.def(
      "all_finite",
      [](uintptr_t x, int64_t n, int threads) { return all_finite(reinterpret_cast<const float*>(x), n, threads); },
      py::arg("x_ptr"), py::arg("n"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
      "True when none of the n float32 values at x_ptr is NaN or infinite");
  py::class_<PackedPatternConv>(m, "PackedPatternConv",
                                "Weights of one pattern-sparse conv layer, grouped by tap mask and packed")
      .def(py::init([](uintptr_t weight, uintptr_t tap_mask, int64_t c_out, int64_t c_in_pg, int64_t kh,
                       int64_t kw, int64_t groups, const std::string& isa) {
             return new PackedPatternConv(reinterpret_cast<const float*>(weight),
                                          reinterpret_cast<const uint8_t*>(tap_mask), c_out, c_in_pg, kh, kw,
                                          groups, isa);
           }),
           py::arg("weight_ptr"), py::arg("tap_mask_ptr"), py::arg("c_out"), py::arg("c_in_per_group"),
           py::arg("kh"), py::arg("kw"), py::arg("groups"), py::arg("isa") = std::string(),
           py::call_guard<py::gil_scoped_release>())
      .def(
          "forward",
          [](const PackedPatternConv& self, uintptr_t x, uintptr_t bias, uintptr_t out, int64_t n, int64_t h,
             int64_t w, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int threads,
             uintptr_t residual, bool relu) {
            ConvEpilogue epi;
            epi.residual = reinterpret_cast<const float*>(residual);
            epi.relu = relu;
            self.forward(reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(bias),
                         reinterpret_cast<float*>(out), n, h, w, sh, sw, ph, pw, dh, dw, threads, epi);
          },
          py::arg("x_ptr"), py::arg("bias_ptr"), py::arg("out_ptr"), py::arg("n"), py::arg("h"), py::arg("w"),
          py::arg("stride_h"), py::arg("stride_w"), py::arg("pad_h"), py::arg("pad_w"), py::arg("dil_h"),
          py::arg("dil_w"), py::arg("num_threads"), py::arg("residual_ptr") = 0, py::arg("relu") = false,
          py::call_guard<py::gil_scoped_release>(),
          "out = conv(x) + bias, then + residual (same shape as out, when residual_ptr != 0), then ReLU (relu)")
      .def_property_readonly("kept_taps", &PackedPatternConv::kept_taps)
      .def("set_scheduling", &PackedPatternConv::set_scheduling, py::arg("min_work_per_thread"),
           py::arg("min_subtiles_per_thread"),
           "Tuning/testing: work (multiply-adds) that justifies a thread, and sub-tiles per thread below which "
           "threads share gathered tiles and split the filters (0 forces that path)")
      .def("set_direct", &PackedPatternConv::set_direct, py::arg("mode"),
           "Tuning/testing: the gather-free stride-1 path: -1 by output width (default), 0 never, 1 always")
      .def("uses_direct", &PackedPatternConv::uses_direct, py::arg("out_w"), py::arg("stride_h"), py::arg("stride_w"))
      .def_property_readonly("isa", &PackedPatternConv::isa_name,
                             "micro-kernel in use: 'avx512', 'avx2' or 'generic'")
      .def_property_readonly("num_pattern_groups", &PackedPatternConv::num_pattern_groups)
      .def_property_readonly("tile_pixels", &PackedPatternConv::tile_pixels,
                             "output pixels per tile (conv group 0)");
}

}  // namespace autosculpt
