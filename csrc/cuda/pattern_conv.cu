// Pattern-sparse conv2d on CUDA: implicit GEMM over the kept taps of each pattern group.
//
// One thread block (4 warps) computes a kBlockM (output pixels) x BN (32 or 64 filters of one tile of
// the host's plan) tile. The K loop runs over (kept tap, block of kBlockK input channels): the input pixels a
// tap reads are gathered straight from x (any strides; 16-byte vector loads when x is channels_last
// and the channel count allows), the weights come pre-packed [K_g][n_g]. Tiles of the next K step are
// loaded into registers while the tensor cores work on the current one (register double buffering).
//   fp16 / bf16:  WMMA 16x16x16, fp32 accumulators
//   fp32 + TF32:  WMMA 16x16x8 (tf32), fp32 accumulators
//   fp32 exact:   SIMT FMA, 8x4 outputs per thread
// The epilogue stages the fp32 tile in shared memory, adds the bias and scatters each filter row to its
// output channel (perm), coalesced along pixels (NCHW output) or along channels (channels_last).
#include "cuda/pattern_conv.h"

#ifdef AUTOSCULPT_CUDA_EMULATE
#include "emulate_shim.h"  // tests/cuda_emu: runs this file's kernel on a CPU for tests without a GPU
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#endif

#include <stdexcept>
#include <string>
#include <type_traits>

namespace autosculpt {
namespace cuda {
namespace {

constexpr int kBlockM = 64;
constexpr int kBlockK = 32;
constexpr int kThreads = 128;
constexpr int kTileFields = 8;
constexpr int kAlign = 16;  // autosculpt/ops/_pattern_groups.py ALIGN

enum Mode { kSimt = 0, kWmma16 = 1, kWmmaTf32 = 2 };

struct KernelParams {
  const void* x;
  const void* w;
  const void* bias;
  void* out;
  const int32_t* perm;
  const int32_t* tiles;
  const int32_t* taps;
  int c_in_pg, h, w_in, out_h, out_w, kw;
  int pixels;  // n * out_h * out_w
  int64_t sxn, sxc, sxh, sxw, son, soc, soh, sow;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int n_ftiles;
  bool vec_x;  // channels_last input, 16-byte vector loads are aligned and exact
};

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Shared-memory tiles. Padding keeps WMMA leading dimensions multiples of 16 bytes and spreads banks.
template <typename T, int BN>
struct SharedTiles {
  static constexpr int kPadA = 16 / sizeof(T);
  static constexpr int kLdA = kBlockK + kPadA;
  static constexpr int kLdB = BN + kPadA;
  static constexpr int kLdC = BN + 4;
  union {
    struct {
      T a[kBlockM][kLdA];  // [pixel][channel]
      T b[kBlockK][kLdB];  // [channel][filter]
    } ab;
    float c[kBlockM][kLdC];  // epilogue staging
  };
};

template <typename T, int MODE, int BN>
__global__ void __launch_bounds__(kThreads) pattern_conv_kernel(const KernelParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  if (MODE != kSimt || sizeof(T) != 4) {  // bf16 / tf32 WMMA need sm_80; the host refuses earlier
    __trap();
  }
#endif
  using Tiles = SharedTiles<T, BN>;
  __shared__ __align__(128) Tiles sm;
  const int tid = threadIdx.x;
  const int pid_n = blockIdx.x % p.n_ftiles;
  const int pid_m = blockIdx.x / p.n_ftiles;
  const int m0 = pid_m * kBlockM;

  const int32_t* tile = p.tiles + static_cast<int64_t>(pid_n) * kTileFields;
  // Packed-weight offsets are stored divided by kAlign; the input channel base is group * C_in_pg.
  const int row0 = tile[0], ncols = tile[1], wbase = tile[2] * kAlign, ldw = tile[3] * kAlign;
  const int tap0 = tile[4], ntaps = tile[5], cin_base = tile[6] * p.c_in_pg;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ wgt = static_cast<const T*>(p.w);
  const int C = p.c_in_pg;
  const int csteps = (C + kBlockK - 1) / kBlockK;
  const int steps = ntaps * csteps;

  // ---- A (input) loader. Generic: thread <-> one pixel, 16 channels strided by 2 (pixels contiguous
  // across the warp, coalesced for NCHW). Vector: kVec channels per 16-byte load, kPasses pixels.
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kVecPerRow = kBlockK / kVec;
  constexpr int kRowsPerPass = kThreads / kVecPerRow;
  constexpr int kPasses = kBlockM / kRowsPerPass;
  constexpr int kAPer = kBlockM * kBlockK / kThreads;  // 16
  constexpr int kBPer = kBlockK * BN / kThreads;  // 16
  static_assert(kAPer * sizeof(T) == kPasses * 16, "generic and vector A registers share one buffer");

  // Per-thread pixel coordinates: the generic loader uses slot 0, the vector loader kPasses slots.
  int pix_nb[kPasses], pix_ih[kPasses], pix_iw[kPasses];
  bool pix_ok[kPasses];
#pragma unroll
  for (int i = 0; i < kPasses; ++i) {
    const int row = p.vec_x ? (tid / kVecPerRow + i * kRowsPerPass) : (tid % kBlockM);
    const int m = m0 + row;
    pix_ok[i] = m < p.pixels;
    const int mm = pix_ok[i] ? m : 0;
    const int ow = mm % p.out_w;
    const int t = mm / p.out_w;
    pix_nb[i] = t / p.out_h;
    pix_ih[i] = (t % p.out_h) * p.stride_h - p.pad_h;
    pix_iw[i] = ow * p.stride_w - p.pad_w;
  }
  const int a_row = tid % kBlockM, a_c0 = tid / kBlockM;  // generic mapping
  const int v_col = (tid % kVecPerRow) * kVec;              // vector mapping
  const int b_col = tid % BN, b_k0 = tid / BN;
  constexpr int kAStep = kThreads / kBlockM;  // 2
  constexpr int kBStep = kThreads / BN;  // 2

  // Raw 16-byte storage viewed as kAPer scalars (generic) or kPasses vectors: one register buffer.
  uint4 a_raw[kPasses];
  T* a_s = reinterpret_cast<T*>(a_raw);
  T b_regs[kBPer];

  auto load_step = [&](int s) {
    const int ti = s / csteps;
    const int c0 = (s - ti * csteps) * kBlockK;
    const int tap = p.taps[tap0 + ti];
    const int dy = (tap / p.kw) * p.dil_h, dx = (tap % p.kw) * p.dil_w;
    if (p.vec_x) {
#pragma unroll
      for (int i = 0; i < kPasses; ++i) {
        const int ih = pix_ih[i] + dy, iw = pix_iw[i] + dx;
        const int c = c0 + v_col;
        const bool ok = pix_ok[i] && ih >= 0 && ih < p.h && iw >= 0 && iw < p.w_in && c < C;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (ok) {
          const int64_t off = pix_nb[i] * p.sxn + static_cast<int64_t>(cin_base + c) + ih * p.sxh + iw * p.sxw;
          v = __ldg(reinterpret_cast<const uint4*>(x + off));
        }
        a_raw[i] = v;
      }
    } else {
      const int ih = pix_ih[0] + dy, iw = pix_iw[0] + dx;
      const bool ok = pix_ok[0] && ih >= 0 && ih < p.h && iw >= 0 && iw < p.w_in;
      const int64_t base = pix_nb[0] * p.sxn + static_cast<int64_t>(cin_base) * p.sxc + ih * p.sxh + iw * p.sxw;
#pragma unroll
      for (int j = 0; j < kAPer; ++j) {
        const int c = c0 + a_c0 + kAStep * j;
        a_s[j] = (ok && c < C) ? x[base + c * p.sxc] : from_float<T>(0.f);
      }
    }
    const T* wrow = wgt + wbase + static_cast<int64_t>(ti * C + c0) * ldw + b_col;
#pragma unroll
    for (int j = 0; j < kBPer; ++j) {
      const int k = b_k0 + kBStep * j;
      b_regs[j] = (b_col < ncols && c0 + k < C) ? wrow[static_cast<int64_t>(k) * ldw] : from_float<T>(0.f);
    }
  };
  auto store_step = [&]() {
    if (p.vec_x) {
#pragma unroll
      for (int i = 0; i < kPasses; ++i)
        *reinterpret_cast<uint4*>(&sm.ab.a[tid / kVecPerRow + i * kRowsPerPass][v_col]) = a_raw[i];
    } else {
#pragma unroll
      for (int j = 0; j < kAPer; ++j) sm.ab.a[a_row][a_c0 + kAStep * j] = a_s[j];
    }
#pragma unroll
    for (int j = 0; j < kBPer; ++j) sm.ab.b[b_k0 + kBStep * j][b_col] = b_regs[j];
  };

  if constexpr (MODE == kSimt) {
    // kTx x kTy threads; thread (tx, ty) owns pixels ty + kTy * i and filters tx + kTx * q.
    constexpr int kTx = BN / 4, kTy = kThreads / kTx, kRows = kBlockM / kTy;
    const int tx = tid % kTx, ty = tid / kTx;
    float acc[kRows][4];
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][q] = 0.f;
    if (steps > 0) load_step(0);
    for (int s = 0; s < steps; ++s) {
      store_step();
      __syncthreads();
      if (s + 1 < steps) load_step(s + 1);
#pragma unroll 8
      for (int k = 0; k < kBlockK; ++k) {
        float av[kRows], bv[4];
#pragma unroll
        for (int i = 0; i < kRows; ++i) av[i] = to_float(sm.ab.a[ty + kTy * i][k]);
#pragma unroll
        for (int q = 0; q < 4; ++q) bv[q] = to_float(sm.ab.b[k][tx + kTx * q]);
#pragma unroll
        for (int i = 0; i < kRows; ++i)
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[i][q] = fmaf(av[i], bv[q], acc[i][q]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int q = 0; q < 4; ++q) sm.c[ty + kTy * i][tx + kTx * q] = acc[i][q];
  } else {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    using namespace nvcuda;
    // Warps tile the block: BN = 64: 2 x 2 warps of 32 x 32; BN = 32: 4 x 1 warps of 16 x 32. Each warp
    // holds kFm x 2 accumulator fragments of 16 x 16.
    constexpr int kFragK = MODE == kWmmaTf32 ? 8 : 16;
    using ElemT = typename std::conditional<MODE == kWmmaTf32, wmma::precision::tf32, T>::type;
    using FragA = wmma::fragment<wmma::matrix_a, 16, 16, kFragK, ElemT, wmma::row_major>;
    using FragB = wmma::fragment<wmma::matrix_b, 16, 16, kFragK, ElemT, wmma::row_major>;
    using FragC = wmma::fragment<wmma::accumulator, 16, 16, kFragK, float>;
    constexpr int kWarpsN = BN / 32, kWarpsM = (kThreads / 32) / kWarpsN, kFm = kBlockM / kWarpsM / 16;
    const int warp = tid / 32;
    const int wm = (warp / kWarpsN) * (16 * kFm), wn = (warp % kWarpsN) * 32;
    FragC acc[kFm][2];
#pragma unroll
    for (int i = 0; i < kFm; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
    if (steps > 0) load_step(0);
    for (int s = 0; s < steps; ++s) {
      store_step();
      __syncthreads();
      if (s + 1 < steps) load_step(s + 1);
#pragma unroll
      for (int kk = 0; kk < kBlockK; kk += kFragK) {
        FragA fa[kFm];
        FragB fb[2];
#pragma unroll
        for (int i = 0; i < kFm; ++i) {
          wmma::load_matrix_sync(fa[i], &sm.ab.a[wm + 16 * i][kk], Tiles::kLdA);
          if constexpr (MODE == kWmmaTf32)
            for (int e = 0; e < fa[i].num_elements; ++e) fa[i].x[e] = wmma::__float_to_tf32(fa[i].x[e]);
        }
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          wmma::load_matrix_sync(fb[j], &sm.ab.b[kk][wn + 16 * j], Tiles::kLdB);
          if constexpr (MODE == kWmmaTf32)
            for (int e = 0; e < fb[j].num_elements; ++e) fb[j].x[e] = wmma::__float_to_tf32(fb[j].x[e]);
        }
#pragma unroll
        for (int i = 0; i < kFm; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < kFm; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&sm.c[wm + 16 * i][wn + 16 * j], acc[i][j], Tiles::kLdC, wmma::mem_row_major);
#endif
  }
  __syncthreads();

  // ---- Epilogue: bias, cast, scatter rows to their output channels.
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  const bool channels_fast = p.soc == 1;
  constexpr int kOutPer = kBlockM * BN / kThreads;
#pragma unroll 4
  for (int e = 0; e < kOutPer; ++e) {
    const int idx = tid + kThreads * e;
    const int j = channels_fast ? idx % BN : idx / kBlockM;
    const int r = channels_fast ? idx / BN : idx % kBlockM;
    const int m = m0 + r;
    if (j >= ncols || m >= p.pixels) continue;
    const int co = p.perm[row0 + j];
    float v = sm.c[r][j];
    if (bias != nullptr) v += to_float(bias[co]);
    const int ow = m % p.out_w;
    const int t = m / p.out_w;
    const int64_t off = (t / p.out_h) * p.son + static_cast<int64_t>(co) * p.soc + (t % p.out_h) * p.soh + ow * p.sow;
    out[off] = from_float<T>(v);
  }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("autosculpt CUDA pattern_conv2d: ") + what + " failed: " +
                             cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

template <typename T, int MODE, int BN>
void launch_bn(const KernelParams& kp, unsigned blocks, cudaStream_t stream) {
#ifdef AUTOSCULPT_CUDA_EMULATE
  (void)stream;
  emu::launch(blocks, kThreads, [&] { pattern_conv_kernel<T, MODE, BN>(kp); });
#else
  pattern_conv_kernel<T, MODE, BN><<<blocks, kThreads, 0, stream>>>(kp);
#endif
  check(cudaGetLastError(), "kernel launch");
}

template <typename T, int MODE>
void launch(const KernelParams& kp, int block_n, unsigned blocks, cudaStream_t stream) {
  if (block_n == 32)
    launch_bn<T, MODE, 32>(kp, blocks, stream);
  else
    launch_bn<T, MODE, 64>(kp, blocks, stream);
}

constexpr int kMaxDevices = 64;

// Compute capability major of a device, asked once per device (a benign race at worst asks twice).
int compute_major(int device) {
  static int cached[kMaxDevices] = {0};
  if (cached[device] == 0) {
    int major = 0;
    check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute");
    cached[device] = major;
  }
  return cached[device];
}

void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("pattern_conv2d_forward: " + msg);
}

}  // namespace

void pattern_conv2d_forward(const PatternConvArgs& a) {
  require(a.x && a.weight && a.out && a.perm && a.tiles && a.taps, "null device pointer");
  require(a.n > 0 && a.c_in_pg > 0 && a.h > 0 && a.w > 0 && a.out_h > 0 && a.out_w > 0 && a.kw > 0,
          "sizes must be positive");
  require(a.n_ftiles > 0, "n_ftiles must be positive");
  require(a.block_n == 32 || a.block_n == 64, "block_n must be 32 or 64 (and tiles its section)");
  require(a.stride_h > 0 && a.stride_w > 0 && a.dil_h > 0 && a.dil_w > 0 && a.pad_h >= 0 && a.pad_w >= 0,
          "stride/dilation must be positive and padding non-negative");
  const int64_t pixels = a.n * a.out_h * a.out_w;
  const int64_t pix_tiles = (pixels + kBlockM - 1) / kBlockM;
  require(pixels < (int64_t(1) << 31) && a.h < (1 << 30) && a.w < (1 << 30), "tensor too large for 32-bit pixel indices");
  require(pix_tiles * a.n_ftiles < (int64_t(1) << 31), "grid too large");

  KernelParams kp{};
  kp.x = reinterpret_cast<const void*>(a.x);
  kp.w = reinterpret_cast<const void*>(a.weight);
  kp.bias = reinterpret_cast<const void*>(a.bias);
  kp.out = reinterpret_cast<void*>(a.out);
  kp.perm = reinterpret_cast<const int32_t*>(a.perm);
  kp.tiles = reinterpret_cast<const int32_t*>(a.tiles);
  kp.taps = reinterpret_cast<const int32_t*>(a.taps);
  kp.c_in_pg = int(a.c_in_pg);
  kp.h = int(a.h);
  kp.w_in = int(a.w);
  kp.out_h = int(a.out_h);
  kp.out_w = int(a.out_w);
  kp.kw = int(a.kw);
  kp.pixels = int(pixels);
  kp.sxn = a.x_stride[0];
  kp.sxc = a.x_stride[1];
  kp.sxh = a.x_stride[2];
  kp.sxw = a.x_stride[3];
  kp.son = a.out_stride[0];
  kp.soc = a.out_stride[1];
  kp.soh = a.out_stride[2];
  kp.sow = a.out_stride[3];
  kp.stride_h = int(a.stride_h);
  kp.stride_w = int(a.stride_w);
  kp.pad_h = int(a.pad_h);
  kp.pad_w = int(a.pad_w);
  kp.dil_h = int(a.dil_h);
  kp.dil_w = int(a.dil_w);
  kp.n_ftiles = int(a.n_ftiles);
  const int64_t vec = a.dtype == DType::kFloat32 ? 4 : 8;  // elements per 16-byte load
  kp.vec_x = a.x_stride[1] == 1 && a.c_in_pg % vec == 0 && a.x % 16 == 0 && a.x_stride[0] % vec == 0 &&
             a.x_stride[2] % vec == 0 && a.x_stride[3] % vec == 0;

  require(a.device >= 0 && a.device < kMaxDevices, "device index out of range");
  // Launch on the tensor's device, then give the caller its current device back (like a device guard).
  int previous = 0;
  check(cudaGetDevice(&previous), "cudaGetDevice");
  if (previous != a.device) check(cudaSetDevice(a.device), "cudaSetDevice");
  struct Restore {
    int device, previous;
    ~Restore() {
      if (device != previous) cudaSetDevice(previous);
    }
  } restore{a.device, previous};
  const int major = compute_major(a.device);
  const bool tensor_core_ok = major >= 8;
  const auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  const auto blocks = static_cast<unsigned>(pix_tiles * a.n_ftiles);
  switch (a.dtype) {
    case DType::kFloat16:
      require(tensor_core_ok, "float16 needs a GPU of compute capability >= 8.0");
      launch<__half, kWmma16>(kp, int(a.block_n), blocks, stream);
      break;
    case DType::kBFloat16:
      require(tensor_core_ok, "bfloat16 needs a GPU of compute capability >= 8.0");
      launch<__nv_bfloat16, kWmma16>(kp, int(a.block_n), blocks, stream);
      break;
    case DType::kFloat32:
      if (a.allow_tf32 && tensor_core_ok)
        launch<float, kWmmaTf32>(kp, int(a.block_n), blocks, stream);
      else
        launch<float, kSimt>(kp, int(a.block_n), blocks, stream);
      break;
    default:
      throw std::invalid_argument("pattern_conv2d_forward: dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  }
}

int runtime_version() {
  int v = 0;
  check(cudaRuntimeGetVersion(&v), "cudaRuntimeGetVersion");
  return v;
}

}  // namespace cuda
}  // namespace autosculpt
