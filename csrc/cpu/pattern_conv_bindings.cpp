// Python binding of PackedPatternConv and all_finite (raw pointers in, GIL released).
#include <pybind11/pybind11.h>

#include <cstring>
#include <string>

#include "cpu/pattern_conv.h"
#include "registry.h"

namespace autosculpt {

void register_pattern_conv(pybind11::module_& m) {
  namespace py = pybind11;
  m.def(
      "all_finite",
      [](uintptr_t x, int64_t n, int threads) { return all_finite(reinterpret_cast<const float*>(x), n, threads); },
      py::arg("x_ptr"), py::arg("n"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
      "True when none of the n float32 values at x_ptr is NaN or infinite");
  m.def(
      "bytes_equal",
      [](uintptr_t a, uintptr_t b, size_t n) {
        return std::memcmp(reinterpret_cast<const void*>(a), reinterpret_cast<const void*>(b), n) == 0;
      },
      py::arg("a_ptr"), py::arg("b_ptr"), py::arg("nbytes"), py::call_guard<py::gil_scoped_release>(),
      "True when the n bytes at a_ptr and b_ptr are identical (a weight cache's staleness check)");
  py::class_<PackedPatternConv>(m, "PackedPatternConv",
                                "Weights of one pattern-sparse conv layer, grouped by tap mask and packed")
      .def(py::init([](uintptr_t weight, uintptr_t tap_mask, int64_t c_out, int64_t c_in_pg, int64_t kh,
                       int64_t kw, int64_t groups, const std::string& isa) {
             return new PackedPatternConv(reinterpret_cast<const float*>(weight),
                                          reinterpret_cast<const uint8_t*>(tap_mask), c_out, c_in_pg, kh, kw,
                                          groups, isa_from_name(isa.c_str()));
           }),
           py::arg("weight_ptr"), py::arg("tap_mask_ptr"), py::arg("c_out"), py::arg("c_in_per_group"),
           py::arg("kh"), py::arg("kw"), py::arg("groups"), py::arg("isa") = std::string(),
           py::call_guard<py::gil_scoped_release>())
      .def(
          "forward",
          [](const PackedPatternConv& self, uintptr_t x, uintptr_t bias, uintptr_t out, int64_t n, int64_t h,
             int64_t w, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int threads,
             uintptr_t residual, bool relu) {
            ConvForwardArgs args;
            args.x = reinterpret_cast<const float*>(x);
            args.bias = reinterpret_cast<const float*>(bias);
            args.out = reinterpret_cast<float*>(out);
            args.n = n, args.h = h, args.w = w;
            args.stride_h = sh, args.stride_w = sw, args.pad_h = ph, args.pad_w = pw, args.dil_h = dh, args.dil_w = dw;
            args.num_threads = threads;
            args.epilogue.residual = reinterpret_cast<const float*>(residual);
            args.epilogue.relu = relu;
            self.forward(args);
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
