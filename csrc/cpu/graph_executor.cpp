// A whole channels-last (NHWC) network as one C++ call: a list of steps (pattern/dense convs through
// the NHWC pattern kernel with their fused epilogues, depthwise convs, max-pool, global average pool,
// adds, ReLU / ReLU6) over
// buffers allocated once. On small networks (CIFAR ResNets: 19 convs of 16-64 channels) the time
// between kernels - Python module calls, output allocation, torch's dispatch for the pooling and the
// classifier - was a third of the deployed model's time; here a step costs a function call.
//
// The steps and the buffer of each value are worked out by the Python side
// (autosculpt/runtime/executor.py) from the fused model's torch.fx graph, which also keeps alive
// every packed conv and bias the steps point to. Buffers 0 and 1 are the caller's input and output.
//
// Non-finite inputs: the pattern kernel skips dropped taps, where conv2d(x, weight * mask) would
// compute 0 * inf = NaN. A conv step with dropped taps checks its input first; when a value is not
// finite, run() stops and returns false, and the caller runs the model through the module route,
// which propagates such values exactly as the reference does.
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <stdexcept>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu/cpu_features.h"
#include "cpu/pattern_conv.h"
#include "cpu/pattern_conv_nhwc.h"
#include "registry.h"

namespace autosculpt {

namespace {

enum class Op { kConv, kDepthwise, kMaxPool, kMeanHW, kAdd, kClamp, kAct, kScale };
enum class Act { kSilu = 1, kSigmoid = 2 };

struct Step {
  Op op;
  int in = -1, in2 = -1, out = -1;  // buffer ids; in2: the conv's residual or the add's second operand
  const PackedPatternConvNhwc* conv = nullptr;
  const float* bias = nullptr;
  const float* dw_weight = nullptr;  // depthwise: [kh * kw][C]
  int64_t n = 0, h = 0, w = 0, c = 0;                                // input (N, H, W, C)
  int64_t kh = 1, kw = 1, sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;  // conv / pool window
  int64_t numel = 0;                                                 // add / relu: elements
  bool relu = false, check_finite = false;
  Act act = Act::kSilu;  // kAct: the function
  float hi = std::numeric_limits<float>::infinity();  // clamp after the ReLU (ReLU6: 6)
  // Image by image: floats per image of the input, second input and output; whether the step may run
  // one image at a time (false: large weights per image of work, e.g. a classifier: whole batch); a
  // linear layer's batch is one row of pixels (n = 1, h = 1, w = batch).
  int64_t in_stride = 0, in2_stride = 0, out_stride = 0;
  bool per_image = false, rows_are_images = false;
};

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};

inline float nan_max(float m, float v) { return (v > m || v != v) ? v : m; }

void max_pool_nhwc(const Step& s, const float* x, float* out, int threads) {
  const int64_t oh = (s.h + 2 * s.ph - s.kh) / s.sh + 1, ow = (s.w + 2 * s.pw - s.kw) / s.sw + 1;
  const int64_t C = s.c, rows = s.n * oh;
  const int nt = int(std::max<int64_t>(1, std::min<int64_t>(threads, rows * ow * C / 65536)));
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t img = row / oh, oy = row % oh;
    for (int64_t ox = 0; ox < ow; ++ox) {
      float* o = out + ((img * oh + oy) * ow + ox) * C;
      for (int64_t k = 0; k < C; ++k) o[k] = -std::numeric_limits<float>::infinity();
      for (int64_t r = 0; r < s.kh; ++r) {
        const int64_t y = oy * s.sh - s.ph + r;
        if (y < 0 || y >= s.h) continue;
        for (int64_t q = 0; q < s.kw; ++q) {
          const int64_t xx = ox * s.sw - s.pw + q;
          if (xx < 0 || xx >= s.w) continue;
          const float* src = x + ((img * s.h + y) * s.w + xx) * C;
#pragma omp simd
          for (int64_t k = 0; k < C; ++k) o[k] = nan_max(o[k], src[k]);
        }
      }
    }
  }
}

void mean_hw(const Step& s, const float* x, float* out) {
  const int64_t hw = s.h * s.w, C = s.c;
  const float inv = 1.0f / float(hw);
  for (int64_t img = 0; img < s.n; ++img) {
    float* o = out + img * C;
    for (int64_t k = 0; k < C; ++k) o[k] = 0.0f;
    const float* src = x + img * hw * C;
    for (int64_t p = 0; p < hw; ++p) {
#pragma omp simd
      for (int64_t k = 0; k < C; ++k) o[k] += src[p * C + k];
    }
#pragma omp simd
    for (int64_t k = 0; k < C; ++k) o[k] *= inv;
  }
}

// ReLU (when asked) then the upper clamp; NaN stays NaN, as torch.relu / relu6.
inline float activate(float v, bool relu, float hi) {
  v = (relu && v < 0.0f) ? 0.0f : v;
  return v > hi ? hi : v;
}

// SiLU (x * sigmoid(x)) or sigmoid of n floats. NaN stays NaN, as in torch.
#if defined(__x86_64__) && defined(__GNUC__)
// exp(x) for x in [-87.3, 88.7] (clamped there; NaN passes): 2^n * p(r), r = x - n ln 2 in [-ln2/2, ln2/2],
// p the degree-6 Taylor polynomial (relative error < 2e-7), 2^n applied with vscalefps.
__attribute__((target("avx512f"), always_inline)) inline __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.7f), _mm512_max_ps(_mm512_set1_ps(-87.3f), x));  // (NaN: 2nd operand)
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln 2 in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

__attribute__((target("avx512f"))) void act_avx512(Act act, const float* in, float* out, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1u);
    const __m512 x = _mm512_maskz_loadu_ps(m, in + i);
    const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), x))));
    _mm512_mask_storeu_ps(out + i, m, act == Act::kSilu ? _mm512_mul_ps(x, sig) : sig);
  }
}
#endif

void act_floats(Act act, const float* in, float* out, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_features().avx512f) {
    act_avx512(act, in, out, n);
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) {
    const float sig = 1.0f / (1.0f + std::exp(-in[i]));
    out[i] = act == Act::kSilu ? in[i] * sig : sig;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// Channels c0 .. c0+16 of a depthwise tile (lanes past C masked off), its accumulators set to the bias.
template <int MR>
__attribute__((target("avx512f"))) inline __mmask16 depthwise_start(const Step& s, int64_t c0, __m512* acc) {
  const __mmask16 m = s.c - c0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (s.c - c0)) - 1u);
  const __m512 b = s.bias ? _mm512_maskz_loadu_ps(m, s.bias + c0) : _mm512_setzero_ps();
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) acc[i] = b;
  return m;
}

// The tile's activation (ReLU, upper clamp; NaN stays) and store of its MR pixels.
template <int MR>
__attribute__((target("avx512f"))) inline void depthwise_store(const Step& s, const __m512* acc, float* out,
                                                               int64_t ox0, int64_t c0, __mmask16 m) {
  const __m512 zero = _mm512_setzero_ps(), hi = _mm512_set1_ps(s.hi);
  const bool clamp = s.hi < std::numeric_limits<float>::infinity();
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    __m512 v = acc[i];
    if (s.relu) v = _mm512_max_ps(zero, v);  // (max_ps returns its 2nd operand on NaN)
    if (clamp) v = _mm512_min_ps(hi, v);
    _mm512_mask_storeu_ps(out + (ox0 + i) * s.c + c0, m, v);
  }
}

// AVX-512 depthwise tile: MR output pixels of one row x 16 channels (c0 .. c0+16, lanes past C masked
// off) held in registers over the taps; out-of-image taps skipped per pixel (zero padding).
template <int MR>
__attribute__((target("avx512f"))) void depthwise_tile(const Step& s, const float* x, float* out, int64_t img,
                                                       int64_t oy, int64_t ox0, int64_t c0) {
  const int64_t C = s.c;
  __m512 acc[MR];
  const __mmask16 m = depthwise_start<MR>(s, c0, acc);
  for (int64_t r = 0; r < s.kh; ++r) {
    const int64_t y = oy * s.sh - s.ph + r * s.dh;
    if (y < 0 || y >= s.h) continue;
    const float* xrow = x + (img * s.h + y) * s.w * C + c0;
    for (int64_t q = 0; q < s.kw; ++q) {
      const __m512 wv = _mm512_maskz_loadu_ps(m, s.dw_weight + (r * s.kw + q) * C + c0);
      const int64_t x0 = ox0 * s.sw - s.pw + q * s.dw;
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const int64_t xx = x0 + i * s.sw;
        if (xx >= 0 && xx < s.w) acc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, xrow + xx * C), wv, acc[i]);
      }
    }
  }
  depthwise_store<MR>(s, acc, out, ox0, c0, m);
}

// 3-wide depthwise tile inside the image's columns (every tap of the MR pixels in bounds; rows out of
// the image skipped): the kernel width and stride are constants, so the MR * 3 loads of a row collapse
// to the (MR - 1) * SW + 3 distinct ones, and no bounds test runs per pixel.
template <int MR, int SW>
__attribute__((target("avx512f"))) void depthwise3_inner(const Step& s, const float* x, float* out, int64_t img,
                                                         int64_t oy, int64_t ox0, int64_t c0) {
  const int64_t C = s.c;
  __m512 acc[MR];
  const __mmask16 m = depthwise_start<MR>(s, c0, acc);
  const int64_t x0 = ox0 * SW - s.pw;
  for (int64_t r = 0; r < s.kh; ++r) {
    const int64_t y = oy * s.sh - s.ph + r * s.dh;
    if (y < 0 || y >= s.h) continue;
    const float* xrow = x + ((img * s.h + y) * s.w + x0) * C + c0;
    const __m512 w0 = _mm512_maskz_loadu_ps(m, s.dw_weight + (r * 3 + 0) * C + c0);
    const __m512 w1 = _mm512_maskz_loadu_ps(m, s.dw_weight + (r * 3 + 1) * C + c0);
    const __m512 w2 = _mm512_maskz_loadu_ps(m, s.dw_weight + (r * 3 + 2) * C + c0);
    __m512 col[(MR - 1) * SW + 3];
#pragma GCC unroll 32
    for (int k = 0; k < (MR - 1) * SW + 3; ++k) col[k] = _mm512_maskz_loadu_ps(m, xrow + k * C);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      acc[i] = _mm512_fmadd_ps(col[i * SW], w0, acc[i]);
      acc[i] = _mm512_fmadd_ps(col[i * SW + 1], w1, acc[i]);
      acc[i] = _mm512_fmadd_ps(col[i * SW + 2], w2, acc[i]);
    }
  }
  depthwise_store<MR>(s, acc, out, ox0, c0, m);
}

using DepthwiseTile = void (*)(const Step&, const float*, float*, int64_t, int64_t, int64_t, int64_t);
const DepthwiseTile kDepthwiseTiles[9] = {nullptr,           &depthwise_tile<1>, &depthwise_tile<2>,
                                          &depthwise_tile<3>, &depthwise_tile<4>, &depthwise_tile<5>,
                                          &depthwise_tile<6>, &depthwise_tile<7>, &depthwise_tile<8>};
#endif

// Depthwise conv (groups = channels, one filter per channel) on NHWC, vectorised over channels; all
// taps computed (dropped taps have zero weights), so NaN and inf propagate as in the reference.
void depthwise_nhwc(const Step& s, const float* x, float* out, int threads) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_features().avx512f) {
    const int64_t oh = (s.h + 2 * s.ph - s.dh * (s.kh - 1) - 1) / s.sh + 1;
    const int64_t ow = (s.w + 2 * s.pw - s.dw * (s.kw - 1) - 1) / s.sw + 1;
    const int64_t rows = s.n * oh;
    const int nt = int(std::max<int64_t>(1, std::min<int64_t>(threads, rows * ow * s.c * s.kh * s.kw / 200000)));
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t img = row / oh, oy = row % oh;
      float* orow = out + row * ow * s.c;
      // 3-wide kernels, stride 1 or 2, dilation 1: the columns whose taps are all inside the image
      // through the constant-shape tile (8 pixels at a time), the border ones through the general one
      const bool three = s.kw == 3 && s.dw == 1 && (s.sw == 1 || s.sw == 2);
      int64_t lo = ow, hi = ow;  // [lo, hi): interior output columns
      if (three) {
        lo = std::min<int64_t>(ow, (s.pw + s.sw - 1) / s.sw);
        hi = s.w + s.pw < 3 ? lo : std::max<int64_t>(lo, std::min<int64_t>(ow, (s.w - 3 + s.pw) / s.sw + 1));
      }
      for (int64_t c0 = 0; c0 < s.c; c0 += 16) {
        int64_t ox0 = 0;
        auto general = [&](int64_t end) {
          for (; ox0 + 8 <= end; ox0 += 8) kDepthwiseTiles[8](s, x, orow, img, oy, ox0, c0);
          if (ox0 < end) kDepthwiseTiles[end - ox0](s, x, orow, img, oy, ox0, c0);
          ox0 = end;
        };
        general(lo);
        if (three) {
          for (; ox0 + 8 <= hi; ox0 += 8)
            (s.sw == 1 ? &depthwise3_inner<8, 1> : &depthwise3_inner<8, 2>)(s, x, orow, img, oy, ox0, c0);
        }
        general(ow);
      }
    }
    return;
  }
#endif
  const int64_t oh = (s.h + 2 * s.ph - s.dh * (s.kh - 1) - 1) / s.sh + 1;
  const int64_t ow = (s.w + 2 * s.pw - s.dw * (s.kw - 1) - 1) / s.sw + 1;
  const int64_t C = s.c, rows = s.n * oh;
  const int nt = int(std::max<int64_t>(1, std::min<int64_t>(threads, rows * ow * C * s.kh * s.kw / 200000)));
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t img = row / oh, oy = row % oh;
    for (int64_t ox = 0; ox < ow; ++ox) {
      float* o = out + ((img * oh + oy) * ow + ox) * C;
      if (s.bias) {
#pragma omp simd
        for (int64_t k = 0; k < C; ++k) o[k] = s.bias[k];
      } else {
#pragma omp simd
        for (int64_t k = 0; k < C; ++k) o[k] = 0.0f;
      }
      for (int64_t r = 0; r < s.kh; ++r) {
        const int64_t y = oy * s.sh - s.ph + r * s.dh;
        if (y < 0 || y >= s.h) continue;
        for (int64_t q = 0; q < s.kw; ++q) {
          const int64_t xx = ox * s.sw - s.pw + q * s.dw;
          if (xx < 0 || xx >= s.w) continue;
          const float* src = x + ((img * s.h + y) * s.w + xx) * C;
          const float* wt = s.dw_weight + (r * s.kw + q) * C;
#pragma omp simd
          for (int64_t k = 0; k < C; ++k) o[k] += src[k] * wt[k];
        }
      }
      if (s.relu || s.hi < std::numeric_limits<float>::infinity()) {
#pragma omp simd
        for (int64_t k = 0; k < C; ++k) o[k] = activate(o[k], s.relu, s.hi);
      }
    }
  }
}

}  // namespace

class GraphExecutor {
 public:
  // buffer_floats[i]: size of buffer i (ids 0 and 1 are the caller's input and output: sizes unused).
  // buffer_floats[i]: size of shared buffer i, holding the whole batch one image after the other (ids
  // 0 and 1 are the caller's input and output: sizes unused). private_floats[k]: one image's floats of
  // buffer id buffer_floats.size() + k, private to the thread running that image: values produced and
  // consumed inside one run of per-image steps. batch: images per call.
  GraphExecutor(const std::vector<int64_t>& buffer_floats, int64_t batch, const std::vector<int64_t>& private_floats)
      : batch_(batch) {
    if (buffer_floats.size() < 2) throw std::invalid_argument("GraphExecutor: expected at least 2 buffers");
    if (batch < 1) throw std::invalid_argument("GraphExecutor: batch must be >= 1");
    for (size_t i = 2; i < buffer_floats.size(); ++i) {
      const int64_t floats = buffer_floats[i];
      if (floats < 1) throw std::invalid_argument("GraphExecutor: a buffer size must be positive");
      void* p = std::aligned_alloc(64, size_t((floats * 4 + 63) / 64 * 64));
      if (p == nullptr) throw std::bad_alloc();
      owned_.emplace_back(static_cast<float*>(p));
    }
    shared_ = int(buffer_floats.size());
    for (int64_t floats : private_floats) {
      if (floats < 1) throw std::invalid_argument("GraphExecutor: a buffer size must be positive");
      private_offset_.push_back(private_total_);
      private_total_ += (floats + 15) / 16 * 16;  // each one 64-byte aligned in the thread's block
    }
    count_ = shared_ + int(private_floats.size());
  }

  void add_conv(pybind11::handle conv, int in, int residual, int out, int64_t n, int64_t h, int64_t w, int64_t c,
                int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, uintptr_t bias, bool relu,
                float clamp_max, bool check_finite, bool per_image) {
    Step s{Op::kConv};
    s.conv = nhwc_conv_from_python(conv);
    s.in = check_id(in), s.in2 = residual < 0 ? -1 : check_id(residual), s.out = check_id(out);
    s.n = n, s.h = h, s.w = w, s.c = c, s.sh = sh, s.sw = sw, s.ph = ph, s.pw = pw, s.dh = dh, s.dw = dw;
    s.bias = reinterpret_cast<const float*>(bias);
    s.relu = relu, s.hi = clamp_max, s.check_finite = check_finite;
    const NhwcConvShape shape = nhwc_conv_shape(*s.conv);
    if (n == batch_) {
      const int64_t oh = (h + 2 * ph - dh * (shape.kh - 1) - 1) / sh + 1, ow = (w + 2 * pw - dw * (shape.kw - 1) - 1) / sw + 1;
      s.in_stride = h * w * c;
      s.out_stride = oh * ow * shape.c_out;
      s.per_image = per_image;
    } else if (n == 1 && h == 1 && w == batch_ && !per_image) {
      s.rows_are_images = true;  // a linear layer: batched (its weights are read once for all images)
      s.in_stride = c, s.out_stride = shape.c_out;
    } else {
      throw std::invalid_argument("GraphExecutor.add_conv: n must be the batch (or a linear layer's row of it)");
    }
    s.in2_stride = s.out_stride;
    steps_.push_back(s);
  }

  // weight: [kh * kw][c] contiguous (kept alive by the caller).
  void add_depthwise(int in, int out, int64_t n, int64_t h, int64_t w, int64_t c, int64_t kh, int64_t kw, int64_t sh,
                     int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, uintptr_t weight, uintptr_t bias,
                     bool relu, float clamp_max) {
    if (kh < 1 || kw < 1 || sh < 1 || sw < 1 || ph < 0 || pw < 0 || dh < 1 || dw < 1 || weight == 0 ||
        h + 2 * ph < dh * (kh - 1) + 1 || w + 2 * pw < dw * (kw - 1) + 1)
      throw std::invalid_argument("GraphExecutor.add_depthwise: bad sizes");
    Step s{Op::kDepthwise};
    s.in = check_id(in), s.out = check_id(out);
    s.n = n, s.h = h, s.w = w, s.c = c, s.kh = kh, s.kw = kw, s.sh = sh, s.sw = sw, s.ph = ph, s.pw = pw;
    s.dh = dh, s.dw = dw;
    s.dw_weight = reinterpret_cast<const float*>(weight), s.bias = reinterpret_cast<const float*>(bias);
    s.relu = relu, s.hi = clamp_max;
    set_window_strides(s, c);
    steps_.push_back(s);
  }

  void add_max_pool(int in, int out, int64_t n, int64_t h, int64_t w, int64_t c, int64_t kh, int64_t kw, int64_t sh,
                    int64_t sw, int64_t ph, int64_t pw) {
    if (kh < 1 || kw < 1 || sh < 1 || sw < 1 || ph < 0 || pw < 0 || 2 * ph > kh || 2 * pw > kw || h + 2 * ph < kh ||
        w + 2 * pw < kw)
      throw std::invalid_argument("GraphExecutor.add_max_pool: bad window");
    Step s{Op::kMaxPool};
    s.in = check_id(in), s.out = check_id(out);
    s.n = n, s.h = h, s.w = w, s.c = c, s.kh = kh, s.kw = kw, s.sh = sh, s.sw = sw, s.ph = ph, s.pw = pw;
    set_window_strides(s, c);
    steps_.push_back(s);
  }

  void add_mean_hw(int in, int out, int64_t n, int64_t h, int64_t w, int64_t c) {
    Step s{Op::kMeanHW};
    s.in = check_id(in), s.out = check_id(out), s.n = n, s.h = h, s.w = w, s.c = c;
    check_batch(n);
    s.in_stride = h * w * c, s.out_stride = c, s.per_image = true;
    steps_.push_back(s);
  }

  void add_add(int a, int b, int out, int64_t numel, bool relu, float clamp_max) {
    Step s{Op::kAdd};
    s.in = check_id(a), s.in2 = check_id(b), s.out = check_id(out), s.numel = numel, s.relu = relu;
    s.hi = clamp_max;
    set_elementwise_strides(s);
    steps_.push_back(s);
  }

  // out = SiLU(in) (act 1) or sigmoid(in) (act 2), elementwise; in and out may be the same buffer.
  void add_act(int in, int out, int64_t numel, int act) {
    if (act != int(Act::kSilu) && act != int(Act::kSigmoid))
      throw std::invalid_argument("GraphExecutor.add_act: act must be 1 (SiLU) or 2 (sigmoid)");
    Step s{Op::kAct};
    s.in = check_id(in), s.out = check_id(out), s.numel = numel, s.act = Act(act);
    set_elementwise_strides(s);
    steps_.push_back(s);
  }

  // out[n, y, x, c] = in[n, y, x, c] * scale[n, c] (squeeze-excitation): in (N, H, W, C), scale (N, C).
  void add_scale(int in, int scale, int out, int64_t n, int64_t h, int64_t w, int64_t c) {
    Step s{Op::kScale};
    s.in = check_id(in), s.in2 = check_id(scale), s.out = check_id(out), s.n = n, s.h = h, s.w = w, s.c = c;
    check_batch(n);
    s.in_stride = s.out_stride = h * w * c, s.in2_stride = c, s.per_image = true;
    steps_.push_back(s);
  }

  // out = min(clamp_max, ReLU?(in)); in and out may be the same buffer.
  void add_clamp(int in, int out, int64_t numel, bool relu, float clamp_max) {
    Step s{Op::kClamp};
    s.in = check_id(in), s.out = check_id(out), s.numel = numel, s.relu = relu, s.hi = clamp_max;
    set_elementwise_strides(s);
    steps_.push_back(s);
  }

  // Runs every step; false when a checked conv input held a non-finite value (the output is then
  // incomplete: run the model another way).
  bool run(const float* x, float* out, int threads, double* step_seconds = nullptr) const {
    if (threads <= 0) threads = omp_get_max_threads();
    std::vector<float*> buf(size_t(count_), nullptr);
    buf[0] = const_cast<float*>(x);  // never written: no step outputs to buffer 0
    buf[1] = out;
    for (size_t i = 0; i < owned_.size(); ++i) buf[i + 2] = owned_[i].get();
    with_private_buffers(buf);
    // A batch runs image by image through each run of per-image steps: an image's activations stay in
    // cache from layer to layer (a batch of 8 MobileNetV2 expansions is 38 MB: it streamed from
    // memory), and with a thread per image (batch >= threads) the threads never wait for each other.
    // Steps with large weights (classifiers) run on the whole batch at once.
    const bool split = splits_batch(threads);
    for (size_t si = 0; si < steps_.size();) {
      size_t end = si;
      while (end < steps_.size() && steps_[end].per_image) ++end;
      if (end == si) {  // the whole batch
        const double t0 = step_seconds ? omp_get_wtime() : 0.0;
        if (!run_step(steps_[si], buf, -1, threads)) return false;
        if (step_seconds) step_seconds[si] += omp_get_wtime() - t0;
        ++si;
        continue;
      }
      int failed = 0;
      if (split) {
#pragma omp parallel num_threads(threads)
        {
          std::vector<float*> mine = buf;  // this thread's private buffers
          with_private_buffers(mine);
#pragma omp for schedule(static)
          for (int64_t img = 0; img < batch_; ++img)
            for (size_t k = si; k < end; ++k) {
              const double t0 = step_seconds ? omp_get_wtime() : 0.0;
              if (!run_step(steps_[k], mine, img, 1)) {
#pragma omp atomic write
                failed = 1;
                break;
              }
              if (step_seconds) {
                const double dt = (omp_get_wtime() - t0) / threads;  // (threads run images side by side)
#pragma omp atomic
                step_seconds[k] += dt;
              }
            }
        }
      } else {
        for (int64_t img = 0; img < batch_ && !failed; ++img)
          for (size_t k = si; k < end; ++k) {
            const double t0 = step_seconds ? omp_get_wtime() : 0.0;
            if (!run_step(steps_[k], buf, img, threads)) {
              failed = 1;
              break;
            }
            if (step_seconds) step_seconds[k] += omp_get_wtime() - t0;
          }
      }
      if (failed) return false;
      si = end;
    }
    return true;
  }

  int64_t num_steps() const { return int64_t(steps_.size()); }

  // Whether runs of per-image steps give each thread whole images (else the threads share each image).
  bool splits_batch(int threads) const {
    return threads_take_whole_images(batch_, threads);
  }
  // Per step: true when it runs image by image, false when on the whole batch at once.
  std::vector<bool> per_image_steps() const {
    std::vector<bool> out;
    for (const Step& s : steps_) out.push_back(s.per_image);
    return out;
  }

 private:
  void check_batch(int64_t n) const {
    if (n != batch_) throw std::invalid_argument("GraphExecutor: a step's n must be the executor's batch");
  }
  void set_window_strides(Step& s, int64_t c) const {  // depthwise conv, max-pool: (N, H, W, C) -> (N, OH, OW, C)
    check_batch(s.n);
    const int64_t oh = (s.h + 2 * s.ph - s.dh * (s.kh - 1) - 1) / s.sh + 1;
    const int64_t ow = (s.w + 2 * s.pw - s.dw * (s.kw - 1) - 1) / s.sw + 1;
    s.in_stride = s.h * s.w * c, s.out_stride = oh * ow * c, s.per_image = true;
  }
  void set_elementwise_strides(Step& s) const {
    if (s.numel % batch_) throw std::invalid_argument("GraphExecutor: numel must be a multiple of the batch");
    s.in_stride = s.in2_stride = s.out_stride = s.numel / batch_, s.per_image = true;
  }

  // One step on images [img, img + 1) (img >= 0, the step's per_image) or on the whole batch (img < 0).
  bool run_step(const Step& full, const std::vector<float*>& buf, int64_t img, int threads) const {
    Step s = full;
    const float* in = buf[size_t(s.in)];
    const float* in2 = s.in2 < 0 ? nullptr : buf[size_t(s.in2)];
    float* o = buf[size_t(s.out)];
    if (img >= 0) {  // (a private buffer holds the current image only)
      if (s.in < shared_) in += img * s.in_stride;
      if (s.out < shared_) o += img * s.out_stride;
      if (in2 && s.in2 < shared_) in2 += img * s.in2_stride;
      if (s.rows_are_images) s.w = 1;
      else s.n = 1;
      s.numel = s.out_stride;
    }
    switch (s.op) {
      case Op::kConv:
        if (s.check_finite && !all_finite(in, s.n * s.h * s.w * s.c, threads)) return false;
        nhwc_conv_forward(*s.conv, in, s.bias, o, s.n, s.h, s.w, s.sh, s.sw, s.ph, s.pw, s.dh, s.dw, threads, in2,
                          s.relu, s.hi);
        break;
      case Op::kDepthwise:
        depthwise_nhwc(s, in, o, threads);
        break;
      case Op::kMaxPool:
        max_pool_nhwc(s, in, o, threads);
        break;
      case Op::kMeanHW:
        mean_hw(s, in, o);
        break;
      case Op::kAdd:
#pragma omp simd
        for (int64_t i = 0; i < s.numel; ++i) o[i] = activate(in[i] + in2[i], s.relu, s.hi);
        break;
      case Op::kClamp:
#pragma omp simd
        for (int64_t i = 0; i < s.numel; ++i) o[i] = activate(in[i], s.relu, s.hi);
        break;
      case Op::kAct:
        act_floats(s.act, in, o, s.numel);
        break;
      case Op::kScale:
        for (int64_t img = 0; img < s.n; ++img) {
          const float* sc = in2 + img * s.c;
          for (int64_t p = 0; p < s.h * s.w; ++p) {
            const float* xi = in + (img * s.h * s.w + p) * s.c;
            float* oi = o + (img * s.h * s.w + p) * s.c;
#pragma omp simd
            for (int64_t k = 0; k < s.c; ++k) oi[k] = xi[k] * sc[k];
          }
        }
        break;
    }
    return true;
  }

  int check_id(int id) const {
    if (id < 0 || id >= count_) throw std::invalid_argument("GraphExecutor: buffer id out of range");
    return id;
  }

  // Points the private buffer ids of buf at the calling thread's block (allocated on first use).
  void with_private_buffers(std::vector<float*>& buf) const {
    if (private_offset_.empty()) return;
    static thread_local std::unique_ptr<float[], FreeDeleter> block;
    static thread_local int64_t cap = 0;
    if (private_total_ > cap) {
      void* p = std::aligned_alloc(64, size_t(private_total_ * 4));
      if (p == nullptr) throw std::bad_alloc();
      block.reset(static_cast<float*>(p));
      cap = private_total_;
    }
    for (size_t k = 0; k < private_offset_.size(); ++k) buf[size_t(shared_) + k] = block.get() + private_offset_[k];
  }

  int64_t batch_ = 1;
  int shared_ = 0;                       // buffer ids below: whole-batch buffers; from here: private
  std::vector<int64_t> private_offset_;  // of each private buffer in a thread's block
  int64_t private_total_ = 0;
  int count_ = 0;
  std::vector<std::unique_ptr<float[], FreeDeleter>> owned_;
  std::vector<Step> steps_;
};

void register_graph_executor(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<GraphExecutor>(m, "GraphExecutor",
                            "A channels-last network as a list of C++ steps over buffers allocated once")
      .def(py::init<const std::vector<int64_t>&, int64_t, const std::vector<int64_t>&>(), py::arg("buffer_floats"),
           py::arg("batch") = 1, py::arg("private_floats") = std::vector<int64_t>{})
      .def("add_conv", &GraphExecutor::add_conv, py::arg("conv"), py::arg("in_id"), py::arg("residual_id"),
           py::arg("out_id"), py::arg("n"), py::arg("h"), py::arg("w"), py::arg("c"), py::arg("stride_h"),
           py::arg("stride_w"), py::arg("pad_h"), py::arg("pad_w"), py::arg("dil_h"), py::arg("dil_w"),
           py::arg("bias_ptr"), py::arg("relu"), py::arg("clamp_max"), py::arg("check_finite"), py::arg("per_image"),
           py::keep_alive<1, 2>())
      .def("add_depthwise", &GraphExecutor::add_depthwise, py::arg("in_id"), py::arg("out_id"), py::arg("n"),
           py::arg("h"), py::arg("w"), py::arg("c"), py::arg("kh"), py::arg("kw"), py::arg("sh"), py::arg("sw"),
           py::arg("ph"), py::arg("pw"), py::arg("dh"), py::arg("dw"), py::arg("weight_ptr"), py::arg("bias_ptr"),
           py::arg("relu"), py::arg("clamp_max"))
      .def("add_max_pool", &GraphExecutor::add_max_pool, py::arg("in_id"), py::arg("out_id"), py::arg("n"),
           py::arg("h"), py::arg("w"), py::arg("c"), py::arg("kh"), py::arg("kw"), py::arg("sh"), py::arg("sw"),
           py::arg("ph"), py::arg("pw"))
      .def("add_mean_hw", &GraphExecutor::add_mean_hw, py::arg("in_id"), py::arg("out_id"), py::arg("n"), py::arg("h"),
           py::arg("w"), py::arg("c"))
      .def("add_add", &GraphExecutor::add_add, py::arg("a_id"), py::arg("b_id"), py::arg("out_id"), py::arg("numel"),
           py::arg("relu"), py::arg("clamp_max"))
      .def("add_act", &GraphExecutor::add_act, py::arg("in_id"), py::arg("out_id"), py::arg("numel"), py::arg("act"))
      .def("add_scale", &GraphExecutor::add_scale, py::arg("in_id"), py::arg("scale_id"), py::arg("out_id"),
           py::arg("n"), py::arg("h"), py::arg("w"), py::arg("c"))
      .def("add_clamp", &GraphExecutor::add_clamp, py::arg("in_id"), py::arg("out_id"), py::arg("numel"),
           py::arg("relu"), py::arg("clamp_max"))
      .def(
          "run",
          [](const GraphExecutor& self, uintptr_t x, uintptr_t out, int threads) {
            return self.run(reinterpret_cast<const float*>(x), reinterpret_cast<float*>(out), threads);
          },
          py::arg("x_ptr"), py::arg("out_ptr"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
          "Runs the network; False when a checked conv input was not finite (output incomplete)")
      .def(
          "run_timed",
          [](const GraphExecutor& self, uintptr_t x, uintptr_t out, int threads, uintptr_t step_seconds) {
            return self.run(reinterpret_cast<const float*>(x), reinterpret_cast<float*>(out), threads,
                            reinterpret_cast<double*>(step_seconds));
          },
          py::arg("x_ptr"), py::arg("out_ptr"), py::arg("num_threads"), py::arg("step_seconds_ptr"),
          py::call_guard<py::gil_scoped_release>(),
          "run(), adding each step's wall time (seconds) to step_seconds[i] (float64, num_steps entries)")
      .def_property_readonly("num_steps", &GraphExecutor::num_steps)
      .def("splits_batch", &GraphExecutor::splits_batch, py::arg("num_threads"),
           "whether each thread runs whole images of the batch at this thread count")
      .def_property_readonly("per_image_steps", &GraphExecutor::per_image_steps,
                             "per step: runs image by image (True) or on the whole batch (False)");
}

}  // namespace autosculpt
