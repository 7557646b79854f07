// Host emulation of the few CUDA features csrc/cuda/pattern_conv.cu uses, so its kernel runs on a CPU
// (tests/ops/test_cuda_conv.py compiles it with g++ when no GPU is present). A thread block is 128 OS
// threads with a std::barrier for __syncthreads; blocks run one after another, so `__shared__` can be
// a function-static variable. WMMA fragments hold their whole tile; lane 0 of each warp loads, multiplies and
// stores it for the warp (other lanes' fragments are unused). Tests the indexing, tiling, masking and
// epilogue logic — not timing, not the hardware's fragment layouts.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdint>
using std::fmaf;
#include <cstdlib>
#include <functional>
#include <thread>
#include <vector>

#define __global__
#define __launch_bounds__(n)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#ifndef __forceinline__
#define __forceinline__ inline
#endif
#ifndef __device__
#define __device__
#endif

namespace emu {
inline thread_local dim3 tl_thread, tl_block;
inline thread_local std::barrier<>* tl_barrier = nullptr;

// Runs `blocks` blocks of `threads` threads, one block at a time.
inline void launch(unsigned blocks, unsigned threads, const std::function<void()>& body) {
  for (unsigned b = 0; b < blocks; ++b) {
    std::barrier<> sync(threads);
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        tl_thread = dim3(t, 0, 0);
        tl_block = dim3(b, 0, 0);
        tl_barrier = &sync;
        body();
      });
    for (auto& th : pool) th.join();
  }
}
}  // namespace emu

#define threadIdx (::emu::tl_thread)
#define blockIdx (::emu::tl_block)
inline void __syncthreads() { emu::tl_barrier->arrive_and_wait(); }
inline void __trap() { std::abort(); }
template <typename T> inline T __ldg(const T* p) { return *p; }

// ---- CUDA runtime calls used by the host code: one fake sm_90 device. The CUDA headers above declare
// them (extern "C"); these definitions replace libcudart, which is not linked.
cudaError_t cudaGetDevice(int* device) { *device = 0; return cudaSuccess; }
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) { *value = 9; return cudaSuccess; }
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaRuntimeGetVersion(int* version) { *version = 0; return cudaSuccess; }
const char* cudaGetErrorName(cudaError_t) { return "cudaErrorEmulated"; }
const char* cudaGetErrorString(cudaError_t) { return "emulated error"; }

// ---- WMMA
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
enum layout_t { mem_row_major };
namespace precision { struct tf32 {}; }

template <typename T> struct storage { using type = T; };
template <> struct storage<precision::tf32> { using type = float; };

template <typename Use, int M, int N, int K> struct dims;
template <int M, int N, int K> struct dims<matrix_a, M, N, K> { static constexpr int rows = M, cols = K; };
template <int M, int N, int K> struct dims<matrix_b, M, N, K> { static constexpr int rows = K, cols = N; };
template <int M, int N, int K> struct dims<accumulator, M, N, K> { static constexpr int rows = M, cols = N; };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  using element_type = typename storage<T>::type;
  static constexpr int rows = dims<Use, M, N, K>::rows, cols = dims<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  element_type x[num_elements];
};

inline float as_float(float v) { return v; }
inline float as_float(__half v) { return __half2float(v); }
inline float as_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename F> inline void fill_fragment(F& f, float v) {
  for (int i = 0; i < F::num_elements; ++i) f.x[i] = v;
}
template <typename F, typename P> inline void load_matrix_sync(F& f, const P* p, unsigned ldm) {
  if (threadIdx.x % 32 != 0) return;  // lane 0 computes for the warp; only it stores
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = p[r * ldm + c];
}
template <typename D, typename A, typename B, typename C> inline void mma_sync(D& d, const A& a, const B& b, const C& c) {
  if (threadIdx.x % 32 != 0) return;
  float out[D::num_elements];
  for (int i = 0; i < D::rows; ++i)
    for (int j = 0; j < D::cols; ++j) {
      float acc = c.x[i * D::cols + j];
      for (int k = 0; k < A::cols; ++k) acc += as_float(a.x[i * A::cols + k]) * as_float(b.x[k * B::cols + j]);
      out[i * D::cols + j] = acc;
    }
  for (int i = 0; i < D::num_elements; ++i) d.x[i] = out[i];
}
template <typename F> inline void store_matrix_sync(float* p, const F& f, unsigned ldm, layout_t) {
  if (threadIdx.x % 32 != 0) return;  // one lane writes the warp's tile
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) p[r * ldm + c] = f.x[r * F::cols + c];
}
inline float __float_to_tf32(float v) { return v; }
}  // namespace wmma
}  // namespace nvcuda
