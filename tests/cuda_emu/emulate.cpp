// Builds csrc/cuda/pattern_conv.cu for the host with the emulation shim (see emulate_shim.h) and
// exposes its launcher to ctypes. Compiled by tests/ops/test_cuda_conv.py; not part of the package.
#include "cuda/pattern_conv.cu"

extern "C" int emu_pattern_conv2d_forward(const int64_t* ptrs, const int64_t* sizes, const int64_t* x_stride,
                                          const int64_t* out_stride, char* error, int error_len) {
  autosculpt::cuda::PatternConvArgs a;
  a.x = ptrs[0]; a.weight = ptrs[1]; a.bias = ptrs[2]; a.out = ptrs[3];
  a.perm = ptrs[4]; a.tiles = ptrs[5]; a.taps = ptrs[6];
  a.n = sizes[0]; a.c_in_pg = sizes[1]; a.h = sizes[2]; a.w = sizes[3]; a.out_h = sizes[4]; a.out_w = sizes[5];
  a.kw = sizes[6]; a.stride_h = sizes[7]; a.stride_w = sizes[8]; a.pad_h = sizes[9]; a.pad_w = sizes[10];
  a.dil_h = sizes[11]; a.dil_w = sizes[12]; a.n_ftiles = sizes[13];
  a.dtype = static_cast<autosculpt::cuda::DType>(sizes[14]);
  a.allow_tf32 = sizes[15] != 0;
  a.block_n = sizes[16];
  for (int i = 0; i < 4; ++i) {
    a.x_stride[i] = x_stride[i];
    a.out_stride[i] = out_stride[i];
  }
  try {
    autosculpt::cuda::pattern_conv2d_forward(a);
  } catch (const std::exception& e) {
    std::snprintf(error, error_len, "%s", e.what());
    return 1;
  }
  return 0;
}
