// Block-sparse attention on the CPU (fp32), torch-free: driver, simple kernel and Python binding.
//
// Semantics: out = softmax(scale * q k^T + M) v per (batch, head), where M is the per-head block
// mask (H, ceil(Lq/bs), ceil(Lk/bs)) expanded to tokens (0 kept, -inf dropped). A query block with no
// kept key block outputs zeros. q, k, v, out are contiguous (B, H, L, D).
//
// Work: one task per (batch, head, query block) runs a flash-style online softmax over only its kept
// key blocks. Kernels, by preference: attn_avx512.cpp (AVX-512, run-time checked), attn_portable.cpp
// (vector extensions; AVX2+FMA entry when the CPU has it, else baseline) for block sizes 16/32/64/128,
// and the simple loops below for any other block size (these first pack each used key block once
// per (batch, head)). Tasks are scheduled dynamically: their cost is proportional to their number of
// kept blocks.
#include <omp.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/attn_kernel.h"
#include "cpu/cpu_features.h"
#include "registry.h"

namespace autosculpt {

constexpr int64_t kMaxAttnBlock = 4096;

namespace {

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using AlignedBuffer = std::unique_ptr<float[], FreeDeleter>;

AlignedBuffer aligned_floats(int64_t n) {
  const size_t bytes = size_t((n * int64_t(sizeof(float)) + 63) / 64 * 64);
  void* p = std::aligned_alloc(64, bytes > 0 ? bytes : 64);
  if (p == nullptr) throw std::bad_alloc();
  return AlignedBuffer(static_cast<float*>(p));
}

// Grow-only workspace for the packed K/V, one per calling thread. Fresh multi-MB allocations are
// served by mmap and page-faulted on every call, which cost more than the kernel itself at high
// sparsity (measured ~2 ms of 3 ms at L=1024, 90% sparse); reusing the buffer removes that.
struct Workspace {
  AlignedBuffer data;
  int64_t capacity = 0;
  float* get(int64_t n) {
    if (n > capacity) {
      data = aligned_floats(n);
      capacity = n;
    }
    return data.get();
  }
};

}  // namespace

// 2^x for x <= 0 in plain C that compilers vectorise (libm's exp2f is a scalar call and was ~4x the
// cost of the matrix products here): 2^round(x) from the exponent bits times a degree-7 polynomial of
// 2^f, |f| <= 1/2; x < -126 (and -inf) gives exactly 0; NaN gives NaN (it must reach the output, as in SDPA).
static inline float exp2_portable(float x) {
  const float x_in = x;
  const bool tiny = x < -126.0f;
  const bool nan = x != x;
  x = (tiny || nan) ? -126.0f : x;
  const float n = std::floor(x + 0.5f);
  const float f = x - n;
  float p = 1.525273380405984e-05f;
  p = p * f + 1.5403530393381606e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.618129107628477e-03f;
  p = p * f + 5.550410866482158e-02f;
  p = p * f + 2.402265069591007e-01f;
  p = p * f + 6.931471805599453e-01f;
  p = p * f + 1.0f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return tiny ? 0.0f : (nan ? x_in : p * scale);
}

// Simple task for any block size: the same algorithm with plain loops over packed K^T/V blocks. On x86
// with GCC it is cloned for AVX2+FMA and dispatched at load time (ifunc).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=haswell", "default")))
#endif
void attn_task_generic(const AttnDims& dims, const AttnTask& t, const AttnScratch& sc) {
  const int64_t bs = dims.bs, d = dims.d, dp = dims.dp, nq = t.nq;
  if (t.nk == 0) {
    for (int64_t i = 0; i < nq * d; ++i) t.out[i] = 0.0f;
    return;
  }
  for (int64_t r = 0; r < nq; ++r) {
    for (int64_t c = 0; c < d; ++c) sc.qs[r * dp + c] = t.q[r * d + c] * dims.qscale;
    for (int64_t c = 0; c < dp; ++c) sc.o[r * dp + c] = 0.0f;
    sc.m[r] = -INFINITY;
    sc.l[r] = 0.0f;
  }
  for (int64_t ki = 0; ki < t.nk; ++ki) {
    const int64_t kb = t.kblocks[ki];
    const float* kt = t.kt + kb * d * bs;
    const float* vp = t.vp + kb * bs * dp;
    const int64_t valid = (kb == t.tail_kb) ? t.tail_valid : bs;
    for (int64_t r = 0; r < nq; ++r) {
      float* srow = sc.s + r * bs;
      for (int64_t c = 0; c < valid; ++c) srow[c] = 0.0f;
      for (int64_t k = 0; k < d; ++k) {
        const float a = sc.qs[r * dp + k];
        const float* kr = kt + k * bs;
#pragma omp simd
        for (int64_t c = 0; c < valid; ++c) srow[c] += a * kr[c];
      }
      float mx = -INFINITY;
      for (int64_t c = 0; c < valid; ++c) mx = std::max(mx, srow[c]);
      const float m_new = std::max(mx, sc.m[r]);
      // While every score so far is -inf, subtract 0 instead (-inf - -inf would be NaN): p = alpha = 0.
      const float m_sub = m_new == -INFINITY ? 0.0f : m_new;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < valid; ++c) {
        srow[c] = exp2_portable(srow[c] - m_sub);
        sum += srow[c];
      }
      const float alpha = exp2_portable(sc.m[r] - m_sub);
      sc.l[r] = sc.l[r] * alpha + sum;
      sc.m[r] = m_new;
      float* orow = sc.o + r * dp;
      for (int64_t c = 0; c < d; ++c) orow[c] *= alpha;
      for (int64_t j = 0; j < valid; ++j) {
        const float p = srow[j];
        const float* vr = vp + j * dp;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) orow[c] += p * vr[c];
      }
    }
  }
  for (int64_t r = 0; r < nq; ++r) {
    const float inv = 1.0f / sc.l[r];
    for (int64_t c = 0; c < d; ++c) t.out[r * d + c] = sc.o[r * dp + c] * inv;
  }
}

// isa: 0 = best available, 1 = portable kernels (AVX2 build when the CPU has it), 2 = AVX-512 (error
// when unavailable), 3 = portable kernels, baseline build (tests the non-AVX2 code path).
static void block_attention_forward(const float* q, const float* k, const float* v, const uint8_t* block_mask,
                                    float* out, int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t D,
                                    int64_t bs, float scale, int num_threads, int isa) {
  if (B <= 0 || H <= 0 || Lq <= 0 || Lk <= 0 || D <= 0 || bs <= 0)
    throw std::invalid_argument("block_sparse_attention: sizes and block size must be positive");
  // Scratch grows with bs^2 per thread; the Python op re-tiles larger blocks to <= 128 tokens.
  if (bs > kMaxAttnBlock)
    throw std::invalid_argument("block_sparse_attention: block_size must be <= " + std::to_string(kMaxAttnBlock) +
                                " here (re-tile the mask to smaller blocks)");
  const int64_t nqb = (Lq + bs - 1) / bs, nkb = (Lk + bs - 1) / bs;
  AttnDims dims{bs, D, (D + 15) / 16 * 16, scale * 1.4426950408889634f};
  const bool avx512_ok = cpu_has_avx512f() && attn_avx512_supported_shape(dims);
  // Block sizes the register-tiled kernels handle; others take the simple packed loops.
  const bool tiled_bs = bs == 16 || bs == 32 || bs == 64 || bs == 128;
  // The Python-facing code, read into the Isa the conv kernels share: 1 = at most AVX2 (portable
  // kernels, their AVX2 build when the CPU has it), 3 = the baseline build only.
  Isa choice;
  switch (isa) {
    case 0: choice = Isa::kAuto; break;
    case 1: choice = Isa::kAvx2; break;
    case 2: choice = Isa::kAvx512; break;
    case 3: choice = Isa::kGeneric; break;
    default: throw std::invalid_argument("block_sparse_attention: isa must be 0, 1, 2 or 3");
  }
  const bool use_avx2 = choice != Isa::kGeneric && cpu_has_avx2_fma();
  bool use_avx512 = false;
  if (choice == Isa::kAuto) {
    use_avx512 = avx512_ok;
  } else if (choice == Isa::kAvx512) {
    if (!avx512_ok)
      throw std::invalid_argument("block_sparse_attention: AVX-512 path needs avx512f, block_size in {16, 32, 64, 128} and D <= 256");
    use_avx512 = true;
  }
  if (num_threads <= 0) num_threads = omp_get_max_threads();

  // Kept key blocks of each (head, query block), CSR; and which key blocks any query block uses.
  std::vector<int64_t> offsets(size_t(H * nqb + 1), 0);
  std::vector<int32_t> kept;
  std::vector<uint8_t> used(size_t(H * nkb), 0);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t qb = 0; qb < nqb; ++qb) {
      const uint8_t* row = block_mask + (h * nqb + qb) * nkb;
      for (int64_t kb = 0; kb < nkb; ++kb)
        if (row[kb]) {
          kept.push_back(int32_t(kb));
          used[size_t(h * nkb + kb)] = 1;
        }
      offsets[size_t(h * nqb + qb + 1)] = int64_t(kept.size());
    }

  // The register-tiled kernels read K and V in place (they transpose the query block instead, inside
  // each task); the simple loops read K^T / V blocks packed once per (batch, head).
  const bool in_place = use_avx512 || tiled_bs;
  const int64_t kt_block = in_place ? 0 : D * bs, vp_block = in_place ? 0 : bs * dims.dp;
  static thread_local Workspace workspace;
  float* const kt = in_place ? nullptr : workspace.get(B * H * nkb * (kt_block + vp_block));
  float* const vp = in_place ? nullptr : kt + B * H * nkb * kt_block;
  const int64_t tail_valid = Lk - (nkb - 1) * bs;
  const int64_t tail_kb = tail_valid < bs ? nkb - 1 : -1;

#pragma omp parallel num_threads(num_threads)
  {
    if (!in_place) {
      // Pack every used key block: K^T as [d][bs] and V as [j][dp], zero past Lk and past D.
#pragma omp for collapse(3) schedule(static)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t kb = 0; kb < nkb; ++kb) {
            if (!used[size_t(h * nkb + kb)]) continue;
            const int64_t bh = b * H + h;
            const int64_t rows = std::min(bs, Lk - kb * bs);
            const float* ksrc = k + (bh * Lk + kb * bs) * D;
            const float* vsrc = v + (bh * Lk + kb * bs) * D;
            float* ktd = kt + (bh * nkb + kb) * kt_block;
            float* vpd = vp + (bh * nkb + kb) * vp_block;
            for (int64_t c = 0; c < D; ++c) {
              float* dst = ktd + c * bs;
              for (int64_t j = 0; j < rows; ++j) dst[j] = ksrc[j * D + c];
              for (int64_t j = rows; j < bs; ++j) dst[j] = 0.0f;
            }
            for (int64_t j = 0; j < bs; ++j) {
              float* dst = vpd + j * dims.dp;
              int64_t c = 0;
              if (j < rows)
                for (; c < D; ++c) dst[c] = vsrc[j * D + c];
              for (; c < dims.dp; ++c) dst[c] = 0.0f;
            }
          }
    }

    AlignedBuffer qs = aligned_floats(bs * dims.dp), s = aligned_floats(bs * bs), o = aligned_floats(bs * dims.dp);
    AlignedBuffer stats = aligned_floats(3 * bs + 48 + dims.dp);
    float* zeros = stats.get() + 3 * bs + 48;
    for (int64_t i = 0; i < dims.dp; ++i) zeros[i] = 0.0f;
    const AttnScratch sc{qs.get(), s.get(), o.get(), stats.get(), stats.get() + bs + 16, stats.get() + 2 * bs + 32,
                         zeros};

#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < B * H * nqb; ++task) {
      const int64_t qb = task % nqb, bh = task / nqb, h = bh % H;
      const int64_t row0 = qb * bs;
      const int64_t beg = offsets[size_t(h * nqb + qb)], end = offsets[size_t(h * nqb + qb + 1)];
      AttnTask t{q + (bh * Lq + row0) * D,
                 std::min(bs, Lq - row0),
                 in_place ? nullptr : kt + bh * nkb * kt_block,
                 in_place ? nullptr : vp + bh * nkb * vp_block,
                 k + bh * Lk * D,
                 v + bh * Lk * D,
                 kept.data() + beg,
                 end - beg,
                 tail_kb,
                 tail_valid,
                 out + (bh * Lq + row0) * D};
      if (use_avx512) attn_task_avx512(dims, t, sc);
      else if (tiled_bs && use_avx2) attn_task_portable_avx2(dims, t, sc);
      else if (tiled_bs) attn_task_portable(dims, t, sc);
      else attn_task_generic(dims, t, sc);
    }
  }
}

void register_block_attention(pybind11::module_& m) {
  namespace py = pybind11;
  m.def(
      "block_sparse_attention_fwd",
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t block_mask, uintptr_t out, int64_t B, int64_t H,
         int64_t Lq, int64_t Lk, int64_t D, int64_t block_size, double scale, int num_threads, int isa) {
        block_attention_forward(reinterpret_cast<const float*>(q), reinterpret_cast<const float*>(k),
                                reinterpret_cast<const float*>(v), reinterpret_cast<const uint8_t*>(block_mask),
                                reinterpret_cast<float*>(out), B, H, Lq, Lk, D, block_size, float(scale),
                                num_threads, isa);
      },
      "Block-sparse attention forward, fp32, contiguous (B, H, L, D) tensors and a uint8 (H, nqb, nkb) mask",
      py::arg("q_ptr"), py::arg("k_ptr"), py::arg("v_ptr"), py::arg("block_mask_ptr"), py::arg("out_ptr"),
      py::arg("batch"), py::arg("heads"), py::arg("len_q"), py::arg("len_k"), py::arg("head_dim"),
      py::arg("block_size"), py::arg("scale"), py::arg("num_threads"), py::arg("isa") = 0,
      py::call_guard<py::gil_scoped_release>());
  m.def("block_attention_avx512", &cpu_has_avx512f, "Whether the AVX-512 block-attention kernel runs here");
}

}  // namespace autosculpt
