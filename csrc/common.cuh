// Device helpers shared by the kernels: element conversion, global->shared tile copies, one 16x16 tensor-core
// step through WMMA (16-bit operands, or 3xTF32 for float32 operands so that float32 inputs keep ~float32
// accuracy), a deterministic block reduction, and the device query the launchers use.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "checks.h"
#include "launchers.h"

// The tensor-core paths need sm_80 (bf16 and tf32 WMMA). Kernels compiled for older targets trap.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define FASTINF_OLD_ARCH 1
#else
#define FASTINF_OLD_ARCH 0
#endif

namespace fastinf {

namespace wm = nvcuda::wmma;

// ------------------------------------------------------------------------------------------ conversion
template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Shared-memory row padding (elements) that keeps every row 16-byte aligned (WMMA's ldm rule) and staggers
// rows across banks.
template <typename T>
constexpr int kPad = 16 / sizeof(T);

// ---------------------------------------------------------------------------------------- tile copies
// Copy the ROWS x COLS tile whose top-left element is `g` (row-major, leading dimension ld_g) into shared
// memory `s` (row-major, leading dimension ld_s), converting InT -> OpT; elements outside rows_valid x
// cols_valid are zero. `vec`: the host checked that g's base and ld_g allow 16-byte loads.
template <typename InT, typename OpT, int ROWS, int COLS, int NTHREADS>
__device__ __forceinline__ void load_tile(OpT* __restrict__ s, int ld_s, const InT* __restrict__ g, int64_t ld_g,
                                          int rows_valid, int cols_valid, bool vec) {
  constexpr int CH = 16 / sizeof(InT);  // elements of one 16-byte chunk
  static_assert(COLS % CH == 0, "tile width must be a multiple of a 16-byte chunk");
  constexpr int CPR = COLS / CH;  // chunks per row
  constexpr int CHUNKS = ROWS * CPR;
#pragma unroll 4
  for (int c = threadIdx.x; c < CHUNKS; c += NTHREADS) {
    const int row = c / CPR;
    const int col = (c % CPR) * CH;
    OpT* dst = s + row * ld_s + col;
    const InT* src = g + static_cast<int64_t>(row) * ld_g + col;
    if constexpr (std::is_same<InT, OpT>::value) {
      if (vec && row < rows_valid && col + CH <= cols_valid) {
        *reinterpret_cast<uint4*>(dst) = __ldg(reinterpret_cast<const uint4*>(src));
        continue;
      }
    }
#pragma unroll
    for (int e = 0; e < CH; ++e) {
      const bool ok = row < rows_valid && col + e < cols_valid;
      dst[e] = from_float<OpT>(ok ? to_float<InT>(src[e]) : 0.f);
    }
  }
}

// -------------------------------------------------------------------------------------- tensor cores
// 16x16 output tiles on the tensor cores through WMMA, operands in shared memory.
// OpT = __half / __nv_bfloat16: K = 16 per step, one mma. OpT = float: K = 8 per step, 3xTF32: each operand
// is split as v = hi + lo with both parts rounded to tf32 and a*b ~ a_hi*b_hi + a_hi*b_lo + a_lo*b_hi, which
// keeps about float32 accuracy for float32 inputs (plain tf32 would lose three decimal digits).
//   typename Mma<T>::template FragA<wm::row_major> a;  a.load(ptr, ld);  Mma<T>::mma(acc, a, b);
#if !FASTINF_OLD_ARCH  // (device passes for sm < 80 see no WMMA tf32/bf16: the kernels trap there)
template <typename OpT>
struct Mma {
  static constexpr int K = 16;
  using Acc = wm::fragment<wm::accumulator, 16, 16, 16, float>;
  template <typename L>
  struct FragA {
    wm::fragment<wm::matrix_a, 16, 16, 16, OpT, L> f;
    __device__ __forceinline__ void load(const OpT* p, unsigned ld) { wm::load_matrix_sync(f, p, ld); }
  };
  template <typename L>
  struct FragB {
    wm::fragment<wm::matrix_b, 16, 16, 16, OpT, L> f;
    __device__ __forceinline__ void load(const OpT* p, unsigned ld) { wm::load_matrix_sync(f, p, ld); }
  };
  template <typename LA, typename LB>
  __device__ __forceinline__ static void mma(Acc& acc, const FragA<LA>& a, const FragB<LB>& b) {
    wm::mma_sync(acc, a.f, b.f, acc);
  }
  // acc += a (16 x K) * b (K x 16)
  template <typename LA, typename LB>
  __device__ __forceinline__ static void step(Acc& acc, const OpT* a, unsigned lda, const OpT* b, unsigned ldb) {
    FragA<LA> fa;
    FragB<LB> fb;
    fa.load(a, lda);
    fb.load(b, ldb);
    mma(acc, fa, fb);
  }
};

template <typename Frag>
__device__ __forceinline__ void split_tf32(Frag& hi, Frag& lo) {
#pragma unroll
  for (int t = 0; t < hi.num_elements; ++t) {
    const float v = hi.x[t];
    const float h = wm::__float_to_tf32(v);
    lo.x[t] = wm::__float_to_tf32(v - h);
    hi.x[t] = h;
  }
}

template <>
struct Mma<float> {
  static constexpr int K = 8;
  using Acc = wm::fragment<wm::accumulator, 16, 16, 8, float>;
  template <typename L>
  struct FragA {
    wm::fragment<wm::matrix_a, 16, 16, 8, wm::precision::tf32, L> hi, lo;
    __device__ __forceinline__ void load(const float* p, unsigned ld) {
      wm::load_matrix_sync(hi, p, ld);
      split_tf32(hi, lo);
    }
  };
  template <typename L>
  struct FragB {
    wm::fragment<wm::matrix_b, 16, 16, 8, wm::precision::tf32, L> hi, lo;
    __device__ __forceinline__ void load(const float* p, unsigned ld) {
      wm::load_matrix_sync(hi, p, ld);
      split_tf32(hi, lo);
    }
  };
  template <typename LA, typename LB>
  __device__ __forceinline__ static void mma(Acc& acc, const FragA<LA>& a, const FragB<LB>& b) {
    wm::mma_sync(acc, a.lo, b.hi, acc);
    wm::mma_sync(acc, a.hi, b.lo, acc);
    wm::mma_sync(acc, a.hi, b.hi, acc);
  }
  template <typename LA, typename LB>
  __device__ __forceinline__ static void step(Acc& acc, const float* a, unsigned lda, const float* b, unsigned ldb) {
    FragA<LA> fa;
    FragB<LB> fb;
    fa.load(a, lda);
    fb.load(b, ldb);
    mma(acc, fa, fb);
  }
};
#endif  // !FASTINF_OLD_ARCH

// ----------------------------------------------------------------------------------------- reduction
// Sum V values over the block (blockDim.x a multiple of 32, at most 1024). `red` holds 32 * V floats of
// shared memory; thread v < V writes the total of value v to out[v]. Deterministic (fixed order).
// Starts and ends with every thread past a __syncthreads, so `red` and `out` can be reused right after.
template <int V>
__device__ __forceinline__ void block_sum(float (&acc)[V], float* red, float* out) {
#pragma unroll
  for (int v = 0; v < V; ++v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[v] += __shfl_xor_sync(0xffffffffu, acc[v], off);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  if (lane == 0) {
#pragma unroll
    for (int v = 0; v < V; ++v) red[warp * V + v] = acc[v];
  }
  __syncthreads();
  if (threadIdx.x < V) {
    float t = 0.f;
    for (int w = 0; w < nwarps; ++w) t += red[w * V + threadIdx.x];
    out[threadIdx.x] = t;
  }
  __syncthreads();
}

// ------------------------------------------------------------------------------------------ host side
inline int device_sm_count() {
  int dev = 0, sms = 0;
  FASTINF_CUDA_CHECK(cudaGetDevice(&dev));
  FASTINF_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

inline int device_max_smem_optin() {
  int dev = 0, bytes = 0;
  FASTINF_CUDA_CHECK(cudaGetDevice(&dev));
  FASTINF_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return bytes;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Call f with a value of the C++ element type of `dt` (float, __half or __nv_bfloat16).
template <typename F>
inline void dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32:
      f(float{});
      break;
    case DType::kFloat16:
      f(__half{});
      break;
    case DType::kBFloat16:
      f(__nv_bfloat16{});
      break;
    default:
      FASTINF_CHECK(false, "unsupported element type code ", static_cast<int>(dt));
  }
}

}  // namespace fastinf
