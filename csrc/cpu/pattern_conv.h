// Pattern-sparse 2-D convolution on the CPU (fp32, NCHW), torch-free.
//
// Semantics: out = conv2d(x, weight * tap_mask[:, None], bias, stride, padding, dilation, groups)
// where tap_mask is (C_out, kh, kw): the taps each output filter keeps, shared by all of its input
// channels. Filters are grouped by identical mask; a group with kept taps T is an implicit GEMM with
// K = C_in * |T| over output pixels. Filters whose mask is empty are never computed (output = bias).
//
// Algorithm (micro-kernels in conv_microkernels.h, input gathering in conv_gather.h):
//  * The constructor groups filters by mask, splits every group into balanced blocks of at most MR
//    filters and packs each block's weights as a K x MR panel (K ordered tap-major, then channel).
//  * forward() walks the N*P output pixels of the batch (images concatenated, so 7x7 at batch 8 is 392
//    pixels) in tiles of NT pixels. For a tile it gathers the input of only the taps some group uses
//    ("col": [48-pixel sub-tile][tap slot][channel][48], zero padding resolved while gathering, masked
//    AVX-512/AVX2 loads), then runs the micro-kernel for every (sub-tile, filter block): MR filters x up
//    to 3 vectors of pixels held in registers over the whole K, bias added on store.
//  * Threads: with enough pixels each thread gathers and computes its own contiguous pixel range (no
//    barrier; its tile stays in its L2). With few pixels (small images at batch 1) the threads gather a
//    chunk of tiles together and split the (tile, filter block) items by estimated work. Tiny layers use
//    fewer threads than asked (a fork/join costs microseconds).
//  * Depthwise convs take a separate per-channel path vectorised along output rows.
//  * The micro-kernel is picked at run time (AVX-512, AVX2+FMA, or portable C++), so the library is
//    built for plain x86-64 (or any other CPU) and still uses the widest vectors the CPU has.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "cpu/conv_gather.h"
#include "cpu/cpu_features.h"

namespace autosculpt {

// Micro-kernel: c[m][0 .. nv*W) = bias[m] + sum_k a[k*mr + m] * B_k[0 .. nv*W), where k runs over
// (tap t < ntaps, channel ci < cin) and B_(t,ci) = b + tap_off[t] + ci * ldb.
using ConvMicroKernel = void (*)(int64_t ntaps, const int64_t* tap_off, int64_t cin, int64_t ldb, const float* a,
                                 const float* b, float* const* c, const float* bias);

// Two adjacent pixel panels at once (b and b + b2), writing c[m][0 .. 6*16): for blocks of few filters.
using ConvMicroKernel2 = void (*)(int64_t ntaps, const int64_t* tap_off, int64_t cin, int64_t ldb, const float* a,
                                  const float* b, int64_t b2, float* const* c, const float* bias);

struct PatternGroup {
  std::vector<int32_t> taps;     // kept tap indices (r * kw + s)
  std::vector<int32_t> filters;  // absolute output channels in this group
  std::vector<int64_t> tap_off;  // per kept tap: offset of its rows inside one tile's col block (floats)
};

// MR (or fewer) filters of one pattern group: one micro-kernel call per pixel sub-tile.
struct FilterBlock {
  int32_t group;          // index into ConvGroupPlan::groups
  int32_t mr;             // number of filters in the block
  int64_t a_offset;       // packed weights (K x mr) start in PackedPatternConv::packed_
  int64_t cost;           // relative work (for load balancing)
  int32_t filters[16];    // absolute output channels
};

struct ConvGroupPlan {
  std::vector<int32_t> slot_taps;      // union of kept taps (tap index per col slot)
  std::vector<PatternGroup> groups;    // non-empty pattern groups
  std::vector<FilterBlock> blocks;
  std::vector<int64_t> block_cost_prefix;  // blocks.size() + 1 entries
  std::vector<int32_t> empty_filters;  // absolute output channels with no kept tap
  int64_t tile = 0;                    // NT: output pixels per tile
};

// Fused epilogue applied to every output element after bias: out = act(conv + bias + residual).
// residual (may be null) has out's shape and layout; relu clamps at zero.
struct ConvEpilogue {
  const float* residual = nullptr;
  bool relu = false;
  bool wide = false;  // AVX-512 loops (set by the conv when the CPU has them)
  bool active() const { return residual != nullptr || relu; }
  // o[0 .. len) at flat output offset `at` (residual read at the same offset).
  void apply(float* o, int64_t at, int64_t len) const;
  // dst[0 .. len) = epilogue(src[0 .. len)), dst at flat output offset `at`.
  void store(float* dst, const float* src, int64_t at, int64_t len) const;
};

// Everything one PackedPatternConv::forward() call takes (the CPU twin of the CUDA kernels' args).
// x: (n, c_in, h, w); out: (n, c_out, out_h, out_w); bias may be null. num_threads <= 0 means
// OpenMP's default. `epilogue` fuses a residual add and/or ReLU.
struct ConvForwardArgs {
  const float* x = nullptr;
  const float* bias = nullptr;
  float* out = nullptr;
  int64_t n = 0, h = 0, w = 0;
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_h = 0, pad_w = 0;
  int64_t dil_h = 1, dil_w = 1;
  int num_threads = 0;
  ConvEpilogue epilogue;
};

// True when no element of x[0, n) is NaN or +-inf.
bool all_finite(const float* x, int64_t n, int num_threads);

class PackedPatternConv {
 public:
  // isa: kAuto (best the CPU supports), kAvx512, kAvx2 or kGeneric (tests force each path; the
  // binding reads the Python name "" / "avx512" / "avx2" / "generic"). Throws if the CPU lacks it.
  PackedPatternConv(const float* weight, const uint8_t* tap_mask, int64_t c_out, int64_t c_in_per_group,
                    int64_t kh, int64_t kw, int64_t groups, Isa isa = Isa::kAuto);

  // See ConvForwardArgs. Every element of out is written.
  void forward(const ConvForwardArgs& args) const;

  int64_t c_out() const { return c_out_; }
  int64_t kept_taps() const;  // sum over filters of kept taps (FLOPs numerator)
  std::string isa_name() const;
  int64_t num_pattern_groups() const;
  int64_t tile_pixels() const { return plans_.empty() ? 0 : plans_[0].tile; }
  // Scheduling knobs (tests force each path with them): multiply-adds that justify one more thread,
  // and the sub-tiles per thread below which threads share gathered tiles and split the filters.
  void set_scheduling(double min_work_per_thread, int64_t min_subtiles_per_thread) {
    min_work_per_thread_ = min_work_per_thread > 0 ? min_work_per_thread : 1.0;
    min_subtiles_per_thread_ = min_subtiles_per_thread;
  }
  // Stride-1 layers can skip the gather (see forward_group_direct): -1 decides by output width,
  // 0 never, 1 always (tests force both).
  void set_direct(int mode) { direct_mode_ = mode; }
  // Whether a forward() with these sizes takes the gather-free stride-1 path.
  bool uses_direct(int64_t out_w, int64_t stride_h, int64_t stride_w) const;

 private:
  // The helpers take forward()'s args with num_threads resolved (> 0) and epilogue.wide set.
  void forward_depthwise(const ConvForwardArgs& args, int64_t oh, int64_t ow) const;
  void fill_empty_filters(const ConvGroupPlan& pl, const float* bias, float* out, int64_t n, int64_t P,
                          const ConvEpilogue& epi, int tid, int T) const;
  struct GroupCall;
  void gather_tile(const GroupCall& a, int64_t g0, int64_t valid, int64_t slot, int64_t c0, int64_t c1,
                   float* colt, std::vector<GatherSeg>& segs) const;
  void compute_block(const GroupCall& a, int64_t g0, int64_t valid, const FilterBlock& blk, const float* colt,
                     float* tmp) const;
  void forward_group(int64_t g, const ConvForwardArgs& args, int64_t oh, int64_t ow) const;
  void forward_group_direct(int64_t g, const ConvForwardArgs& args, int64_t oh, int64_t ow) const;

  int64_t c_out_, c_in_pg_, kh_, kw_, groups_;
  bool depthwise_ = false;
  Isa isa_;  // resolved: never kAuto
  int mr_ = 1, lanes_ = 1, nv_max_ = 1;          // micro-kernel shape: mr_ filters x nv_max_*lanes_ pixels
  const ConvMicroKernel* kernels_ = nullptr;     // [(mr - 1) * nv_max_ + (nv - 1)]
  const ConvMicroKernel2* kernels2_ = nullptr;   // [mr - 1] for mr <= mr2_max_ (AVX-512 only)
  int mr2_max_ = 0;
  double min_work_per_thread_ = 4e5;
  int64_t min_subtiles_per_thread_ = 6;
  int direct_mode_ = -1;
  std::vector<ConvGroupPlan> plans_;             // per conv group
  std::vector<float> packed_;                    // all blocks' weight panels
  std::vector<float> dw_weight_;                 // depthwise: weights (c_out, kh*kw)
  std::vector<std::vector<int32_t>> dw_taps_;    // depthwise: kept taps per channel
};

}  // namespace autosculpt
