// Pattern-sparse 2-D convolution on CUDA GPUs, torch-free (raw device pointers + a stream handle).
//
// Same semantics as csrc/cpu/pattern_conv.h: out = conv2d(x, weight * tap_mask[:, None], bias, ...).
// The host side (Python, autosculpt/ops/_pattern_groups.py) groups filters by identical tap mask and
// passes three small int32 tables plus the packed weights:
//   perm  [C_out]          output channel of each packed filter row (every channel exactly once)
//   taps  [...]            kept tap indices r * kw + s of all groups, back to back
//   tiles [n_ftiles][8]    per tile of <= block_n filters (one layout per block_n): first perm row, filters in the
//                          tile, packed-weight offset of its first column / 16, leading dimension / 16
//                          (the group's filter count rounded up to 16), first tap, tap count, conv
//                          group index (first input channel = index * c_in_pg), spare
// and packed weights: per group a row-major [K_g = taps * C_in_pg][ld_g] block, k = tap * C_in_pg + ci,
// zero-padded columns; every row starts 16-element aligned.
// This header has no CUDA types so the pybind11 bindings compile with the host compiler.
#pragma once
#include <cstdint>

namespace autosculpt {
namespace cuda {

constexpr int kBlockNs[2] = {32, 64};  // filters per tile: args.tiles is the matching layout section

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct PatternConvArgs {
  uintptr_t x = 0, weight = 0, bias = 0, out = 0;  // bias may be 0 (no bias)
  uintptr_t perm = 0, tiles = 0, taps = 0;
  int64_t n = 0, c_in_pg = 0, h = 0, w = 0, out_h = 0, out_w = 0, kw = 0;
  int64_t x_stride[4] = {0, 0, 0, 0};    // elements, NCHW order of dimensions
  int64_t out_stride[4] = {0, 0, 0, 0};  // elements, NCHW order of dimensions
  int64_t stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, dil_h = 1, dil_w = 1;
  int64_t n_ftiles = 0;  // rows of the tiles table (the block_n section, pointer already offset)
  int64_t block_n = 64;  // 32 or 64: the tile layout the tables were cut for
  DType dtype = DType::kFloat32;
  bool allow_tf32 = false;  // fp32 inputs: use TF32 tensor cores (as cuDNN does when torch allows it)
  int device = 0;
  uintptr_t stream = 0;  // cudaStream_t of the caller (torch.cuda.current_stream().cuda_stream)
};

// Validates the arguments (std::invalid_argument) and launches on args.stream; CUDA failures raise
// std::runtime_error naming the call and the CUDA error. Asynchronous like any kernel launch.
void pattern_conv2d_forward(const PatternConvArgs& args);

// CUDA runtime version this module was built against (e.g. 13000); touches no driver.
int runtime_version();

}  // namespace cuda
}  // namespace autosculpt
