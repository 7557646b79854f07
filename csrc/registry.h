// Each kernel family registers its Python bindings through one function declared here,
// so the single PYBIND11_MODULE stays small and families never edit each other's files.
#pragma once
#include <pybind11/pybind11.h>

namespace autosculpt {
void register_info(pybind11::module_& m);
void register_pattern_conv(pybind11::module_& m);
void register_block_attention(pybind11::module_& m);
void register_max_pool(pybind11::module_& m);
void register_pattern_conv_nhwc(pybind11::module_& m);
void register_graph_executor(pybind11::module_& m);
#ifdef AUTOSCULPT_WITH_CUDA
void register_cuda(pybind11::module_& m);
#endif
}  // namespace autosculpt
