// The one Python module of AutoSculpt's compiled kernels. It never links libtorch:
// every kernel takes raw pointers (uintptr_t), sizes and, for CUDA, a stream handle.
#include "registry.h"

#include "cpu/cpu_features.h"

#include <omp.h>
#include <string>

namespace py = pybind11;

namespace autosculpt {

static std::string simd_level() {
  const CpuFeatures& f = cpu_features();
  if (!f.x86) return "generic";
  if (f.avx512f) return "avx512";
  if (f.avx2_fma) return "avx2";
  return "sse2";
}

void register_info(py::module_& m) {
  m.attr("__version__") = AUTOSCULPT_VERSION;
  m.attr("cuda_requested") = AUTOSCULPT_CUDA_REQUESTED;  // AUTOSCULPT_CUDA at build time: auto|0|1
#ifdef AUTOSCULPT_WITH_CUDA
  m.attr("cuda_built") = true;
  m.attr("cuda_archs") = AUTOSCULPT_CUDA_ARCHS;
#else
  m.attr("cuda_built") = false;
  m.attr("cuda_archs") = "";
#endif
  m.def("simd_level", &simd_level, "Best SIMD instruction set the CPU kernels use on this machine");
  m.def("omp_max_threads", [] { return omp_get_max_threads(); });
}

}  // namespace autosculpt

PYBIND11_MODULE(_C, m) {
  m.doc() = "AutoSculpt compiled kernels (torch-free: raw pointers in)";
  autosculpt::register_info(m);
  autosculpt::register_pattern_conv(m);
  autosculpt::register_block_attention(m);
  autosculpt::register_max_pool(m);
  autosculpt::register_pattern_conv_nhwc(m);
  autosculpt::register_graph_executor(m);
#ifdef AUTOSCULPT_WITH_CUDA
  autosculpt::register_cuda(m);
#endif
}
