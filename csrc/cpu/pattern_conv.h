// Pattern-sparse 2-D convolution on the CPU (fp32, NCHW), torch-free.
//
// Semantics: out = conv2d(x, weight * tap_mask[:, None], bias, stride, padding, dilation, groups)
// where tap_mask is (C_out, kh, kw): the taps each output filter keeps, shared by all of its input
// channels. Filters are grouped by identical mask; a group with kept taps T is an implicit GEMM with
// K = C_in * |T|. Filters whose mask is empty are never computed (their output is the bias).
#pragma once
#include <cstdint>
#include <vector>

namespace autosculpt {

struct PatternGroup {
  std::vector<int32_t> taps;      // kept tap indices (r * kw + s)
  std::vector<int32_t> filters;   // output channels in this group (within the conv group)
  std::vector<float> packed;      // weights packed for the micro-kernel
};

class PackedPatternConv {
 public:
  PackedPatternConv(const float* weight, const uint8_t* tap_mask, int64_t c_out, int64_t c_in_per_group,
                    int64_t kh, int64_t kw, int64_t groups);

  // x: (n, c_in, h, w); out: (n, c_out, out_h, out_w); bias may be null.
  void forward(const float* x, const float* bias, float* out, int64_t n, int64_t h, int64_t w,
               int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
               int64_t dil_w, int num_threads) const;

  int64_t c_out() const { return c_out_; }
  int64_t kept_taps() const;  // sum over filters of kept taps (FLOPs numerator)

 private:
  int64_t c_out_, c_in_pg_, kh_, kw_, groups_;
  bool depthwise_;
  std::vector<std::vector<PatternGroup>> groups_of_;  // per conv group
  std::vector<float> dw_weight_;                      // depthwise: masked weights (c_out, kh*kw)
  std::vector<std::vector<int32_t>> dw_taps_;         // depthwise: kept taps per channel
};

}  // namespace autosculpt
