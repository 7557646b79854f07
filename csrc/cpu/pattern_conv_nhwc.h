// The channels-last pattern conv (pattern_conv_nhwc.cpp) as other kernels call it from C++: the
// graph executor (graph_executor.cpp) runs a whole network's convs through it without Python.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>

namespace autosculpt {

class PackedPatternConvNhwc;

// The packed conv held by a Python PackedPatternConvNhwc object (TypeError for any other object).
const PackedPatternConvNhwc* nhwc_conv_from_python(pybind11::handle obj);

// PackedPatternConvNhwc::forward: out = min(clamp_max, ReLU?(conv(x) + bias (+ residual))), all (N, H, W, C)
// contiguous (ReLU6: relu and clamp_max 6; +inf: no clamp).
void nhwc_conv_forward(const PackedPatternConvNhwc& conv, const float* x, const float* bias, float* out, int64_t n,
                       int64_t h, int64_t w, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                       int threads, const float* residual, bool relu, float clamp_max);

// Whether a batch of n images runs with each of `threads` threads taking whole images (no barrier
// between a thread's steps): at least one image per thread, and the images split evenly or many of
// them. The conv kernel and the graph executor's runs of per-image steps decide alike.
inline bool threads_take_whole_images(int64_t n, int threads) {
  return threads > 1 && n >= threads && (n % threads == 0 || n >= 4 * threads);
}

// Output channels and kernel size of a conv (the graph executor's per-image strides).
struct NhwcConvShape {
  int64_t c_out, kh, kw;
};
NhwcConvShape nhwc_conv_shape(const PackedPatternConvNhwc& conv);

}  // namespace autosculpt
