#include "cpu/pattern_conv.h"

#include <omp.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <stdexcept>

#include "registry.h"

namespace autosculpt {

namespace {
constexpr int64_t kTileP = 64;  // output pixels per tile

int64_t out_size(int64_t in, int64_t k, int64_t stride, int64_t pad, int64_t dil) {
  return (in + 2 * pad - dil * (k - 1) - 1) / stride + 1;
}
}  // namespace

PackedPatternConv::PackedPatternConv(const float* weight, const uint8_t* tap_mask, int64_t c_out,
                                     int64_t c_in_pg, int64_t kh, int64_t kw, int64_t groups)
    : c_out_(c_out), c_in_pg_(c_in_pg), kh_(kh), kw_(kw), groups_(groups) {
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
  const int64_t c_out_pg = c_out / groups;
  groups_of_.resize(groups);
  for (int64_t g = 0; g < groups; ++g) {
    std::map<std::vector<int32_t>, int> index;
    auto& pg = groups_of_[g];
    for (int64_t f = 0; f < c_out_pg; ++f) {
      const int64_t co = g * c_out_pg + f;
      std::vector<int32_t> taps;
      for (int64_t t = 0; t < taps_n; ++t)
        if (tap_mask[co * taps_n + t]) taps.push_back(int32_t(t));
      if (taps.empty()) continue;
      auto it = index.find(taps);
      if (it == index.end()) {
        it = index.emplace(taps, int(pg.size())).first;
        pg.push_back(PatternGroup{taps, {}, {}});
      }
      pg[it->second].filters.push_back(int32_t(f));
    }
    // packed[f][t][ci]: the K dimension runs over (kept tap, input channel).
    for (auto& grp : pg) {
      const int64_t k = int64_t(grp.taps.size()) * c_in_pg;
      grp.packed.resize(grp.filters.size() * k);
      for (size_t i = 0; i < grp.filters.size(); ++i) {
        const int64_t co = g * c_out_pg + grp.filters[i];
        for (size_t ti = 0; ti < grp.taps.size(); ++ti)
          for (int64_t ci = 0; ci < c_in_pg; ++ci)
            grp.packed[i * k + ti * c_in_pg + ci] = weight[(co * c_in_pg + ci) * taps_n + grp.taps[ti]];
      }
    }
  }
}

int64_t PackedPatternConv::kept_taps() const {
  int64_t total = 0;
  if (depthwise_) {
    for (auto& t : dw_taps_) total += int64_t(t.size());
    return total;
  }
  for (auto& pg : groups_of_)
    for (auto& grp : pg) total += int64_t(grp.taps.size() * grp.filters.size());
  return total;
}

void PackedPatternConv::forward(const float* x, const float* bias, float* out, int64_t n, int64_t h,
                                int64_t w, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                                int64_t dw, int num_threads) const {
  const int64_t oh = out_size(h, kh_, sh, ph, dh), ow = out_size(w, kw_, sw, pw, dw);
  if (oh <= 0 || ow <= 0) throw std::invalid_argument("PackedPatternConv: empty output");
  const int64_t P = oh * ow, taps_n = kh_ * kw_;
  const int64_t c_in = c_in_pg_ * groups_;
  const int64_t c_out_pg = c_out_ / groups_;
  if (num_threads <= 0) num_threads = omp_get_max_threads();

  if (depthwise_) {
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t b = 0; b < n; ++b)
      for (int64_t c = 0; c < c_out_; ++c) {
        const float* xi = x + (b * c_in + c) * h * w;
        float* o = out + (b * c_out_ + c) * P;
        const float bv = bias ? bias[c] : 0.f;
        for (int64_t p = 0; p < P; ++p) o[p] = bv;
        for (int32_t t : dw_taps_[c]) {
          const float wv = dw_weight_[c * taps_n + t];
          const int64_t r = t / kw_, s = t % kw_;
          for (int64_t y = 0; y < oh; ++y) {
            const int64_t iy = y * sh - ph + r * dh;
            if (iy < 0 || iy >= h) continue;
            for (int64_t xx = 0; xx < ow; ++xx) {
              const int64_t ix = xx * sw - pw + s * dw;
              if (ix >= 0 && ix < w) o[y * ow + xx] += wv * xi[iy * w + ix];
            }
          }
        }
      }
    return;
  }

  const int64_t tiles = (P + kTileP - 1) / kTileP;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> col(size_t(taps_n * c_in_pg_ * kTileP));
    std::vector<float> acc(kTileP);
#pragma omp for collapse(3) schedule(static)
    for (int64_t b = 0; b < n; ++b)
      for (int64_t g = 0; g < groups_; ++g)
        for (int64_t tile = 0; tile < tiles; ++tile) {
          const int64_t p0 = tile * kTileP, np = std::min(kTileP, P - p0);
          const float* xg = x + (b * c_in + g * c_in_pg_) * h * w;
          // im2col for all taps of this pixel tile: col[t][ci][p]
          for (int64_t t = 0; t < taps_n; ++t) {
            const int64_t r = t / kw_, s = t % kw_;
            for (int64_t ci = 0; ci < c_in_pg_; ++ci) {
              float* dst = col.data() + (t * c_in_pg_ + ci) * kTileP;
              const float* src = xg + ci * h * w;
              for (int64_t i = 0; i < np; ++i) {
                const int64_t p = p0 + i, y = p / ow, xx = p % ow;
                const int64_t iy = y * sh - ph + r * dh, ix = xx * sw - pw + s * dw;
                dst[i] = (iy >= 0 && iy < h && ix >= 0 && ix < w) ? src[iy * w + ix] : 0.f;
              }
            }
          }
          float* og = out + (b * c_out_ + g * c_out_pg) * P;
          // every filter's output: bias first (covers empty filters), then its group's GEMM row
          for (int64_t f = 0; f < c_out_pg; ++f) {
            const float bv = bias ? bias[g * c_out_pg + f] : 0.f;
            for (int64_t i = 0; i < np; ++i) og[f * P + p0 + i] = bv;
          }
          for (const auto& grp : groups_of_[g]) {
            const int64_t k = int64_t(grp.taps.size()) * c_in_pg_;
            for (size_t fi = 0; fi < grp.filters.size(); ++fi) {
              const float* a = grp.packed.data() + fi * k;
              std::fill(acc.begin(), acc.end(), 0.f);
              for (size_t ti = 0; ti < grp.taps.size(); ++ti) {
                const float* crow = col.data() + int64_t(grp.taps[ti]) * c_in_pg_ * kTileP;
                const float* arow = a + ti * c_in_pg_;
                for (int64_t ci = 0; ci < c_in_pg_; ++ci) {
                  const float av = arow[ci];
                  const float* cr = crow + ci * kTileP;
#pragma omp simd
                  for (int64_t i = 0; i < kTileP; ++i) acc[i] += av * cr[i];
                }
              }
              float* o = og + grp.filters[fi] * P + p0;
              for (int64_t i = 0; i < np; ++i) o[i] += acc[i];
            }
          }
        }
  }
}

void register_pattern_conv(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<PackedPatternConv>(m, "PackedPatternConv",
                                "Weights of one pattern-sparse conv layer, grouped by tap mask and packed")
      .def(py::init([](uintptr_t weight, uintptr_t tap_mask, int64_t c_out, int64_t c_in_pg, int64_t kh,
                       int64_t kw, int64_t groups) {
             return new PackedPatternConv(reinterpret_cast<const float*>(weight),
                                          reinterpret_cast<const uint8_t*>(tap_mask), c_out, c_in_pg, kh, kw,
                                          groups);
           }),
           py::arg("weight_ptr"), py::arg("tap_mask_ptr"), py::arg("c_out"), py::arg("c_in_per_group"),
           py::arg("kh"), py::arg("kw"), py::arg("groups"), py::call_guard<py::gil_scoped_release>())
      .def(
          "forward",
          [](const PackedPatternConv& self, uintptr_t x, uintptr_t bias, uintptr_t out, int64_t n, int64_t h,
             int64_t w, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int threads) {
            self.forward(reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(bias),
                         reinterpret_cast<float*>(out), n, h, w, sh, sw, ph, pw, dh, dw, threads);
          },
          py::arg("x_ptr"), py::arg("bias_ptr"), py::arg("out_ptr"), py::arg("n"), py::arg("h"), py::arg("w"),
          py::arg("stride_h"), py::arg("stride_w"), py::arg("pad_h"), py::arg("pad_w"), py::arg("dil_h"),
          py::arg("dil_w"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("kept_taps", &PackedPatternConv::kept_taps);
}

}  // namespace autosculpt
