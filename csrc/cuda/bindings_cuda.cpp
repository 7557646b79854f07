// pybind11 bindings of the CUDA kernels. Compiled by the host compiler: the kernels' header has no
// CUDA types, so this file needs neither nvcc nor the CUDA headers.
#include <pybind11/pybind11.h>

#include "cuda/pattern_conv.h"
#include "registry.h"

namespace py = pybind11;

namespace autosculpt {

void register_cuda(py::module_& m) {
  m.def(
      "pattern_conv2d_cuda",
      [](uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t out, uintptr_t perm, uintptr_t tiles,
         uintptr_t taps, int64_t n, int64_t c_in_pg, int64_t h, int64_t w, int64_t out_h, int64_t out_w,
         int64_t kw, py::tuple x_stride, py::tuple out_stride, int64_t stride_h, int64_t stride_w,
         int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t n_ftiles, int64_t block_n,
         int dtype, bool allow_tf32, int device, uintptr_t stream) {
        if (x_stride.size() != 4 || out_stride.size() != 4)
          throw std::invalid_argument("pattern_conv2d_cuda: x_stride and out_stride must have 4 entries");
        if (dtype < 0 || dtype > 2)
          throw std::invalid_argument("pattern_conv2d_cuda: dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)");
        cuda::PatternConvArgs a;
        a.x = x; a.weight = weight; a.bias = bias; a.out = out;
        a.perm = perm; a.tiles = tiles; a.taps = taps;
        a.n = n; a.c_in_pg = c_in_pg; a.h = h; a.w = w; a.out_h = out_h; a.out_w = out_w; a.kw = kw;
        for (int i = 0; i < 4; ++i) {
          a.x_stride[i] = x_stride[i].cast<int64_t>();
          a.out_stride[i] = out_stride[i].cast<int64_t>();
        }
        a.stride_h = stride_h; a.stride_w = stride_w; a.pad_h = pad_h; a.pad_w = pad_w;
        a.dil_h = dil_h; a.dil_w = dil_w; a.n_ftiles = n_ftiles; a.block_n = block_n;
        a.dtype = static_cast<cuda::DType>(dtype);
        a.allow_tf32 = allow_tf32;
        a.device = device;
        a.stream = stream;
        py::gil_scoped_release release;
        cuda::pattern_conv2d_forward(a);
      },
      "Pattern-sparse conv2d on a CUDA stream (raw device pointers; see csrc/cuda/pattern_conv.h). "
      "tiles must point at the block_n (32 or 64) section of the tile table.");
  m.def("cuda_runtime_version", &cuda::runtime_version, "CUDA runtime version the module was built with");
  m.attr("cuda_block_ns") = py::make_tuple(cuda::kBlockNs[0], cuda::kBlockNs[1]);
}

}  // namespace autosculpt
