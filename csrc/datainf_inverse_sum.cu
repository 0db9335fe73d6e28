// DataInf's preconditioned test vectors (METHODS.md section 3, fastinf/ops/datainf_inverse_sum.py):
//   H = (T - C G / n) / lam,   C_ji = (t_j . g_i) / (lam + |g_i|^2)
// in two tensor-core passes over G, all m test vectors at once:
//   pass 1 (coef):  P = T G^T (m x n, float32), split over the width d so that small m x n still fills the
//                   GPU (deterministic: one float32 slice per split, summed afterwards), plus |g_i|^2 from the
//                   same G tiles;
//   pass 2 (apply): H = T / lam - (C G) / (n lam), C_ji = P_ji cinv_i rscale_j formed in float32 on the fly
//                   while the C tile is staged in shared memory (cinv_i = 1 / (lam + |g_i|^2); rscale_j a power
//                   of two putting row j's largest |C| in [0.5, 1)); for 16-bit inputs C is staged as hi + lo in
//                   the input type (two tensor-core products: ~16 / 22 significant bits instead of 8 / 11), so
//                   near-collinear gradients keep the cancellation T - C G / n. 1/n, 1/lam and 1/rscale are
//                   applied in the float32 epilogue (never folded into C: fp16 would reach subnormals); the
//                   epilogue reads T once. (Emulated in float64 by fastinf/kernels/_emulate.py.)
// Blocks that share a tile of G are adjacent in launch order (m tiles vary fastest), so each G tile is read
// from device memory once per pass and served from L2 to the other m tiles. The only m x n intermediate is P,
// m n 4 bytes (9 MB at m = 512, n = 4500), against n d 2 bytes of G (590 MB at d = 65k): a single pass would
// need every C_ji before any g_i can be used (a grid-wide dependency) or atomics on the m x d output.
#include "common.cuh"

namespace fastinf {
namespace {

constexpr int kThreads = 128;                     // 4 warps, each a 32 x 32 quarter of the 64 x 64 tile
constexpr int kBM = 64, kBN = 64, kBK = 32;       // coef: tests x training rows x width
constexpr int kAM = 64, kAD = 64, kAK = 32;       // apply: tests x width x training rows

template <typename T, bool NSQ>
__global__ void __launch_bounds__(kThreads)
    datainf_coef_kernel(const T* __restrict__ Tm, const T* __restrict__ G, float* __restrict__ P_part,
                        float* __restrict__ nsq_part, int m, int n, int64_t d, int64_t d_per_split, bool vec) {
#if FASTINF_OLD_ARCH
  __trap();
#else
  using M = Mma<T>;
  constexpr int LD = kBK + kPad<T>;
  constexpr int LDO = kBN + 4;
  __shared__ __align__(128) T ts[kBM * LD];
  __shared__ __align__(128) T gs[kBN * LD];
  __shared__ __align__(128) float out[kBM * LDO];

  const int mt = (m + kBM - 1) / kBM;  // m tiles vary fastest: blocks sharing a G tile are adjacent
  const int m0 = static_cast<int>(blockIdx.x % mt) * kBM, n0 = static_cast<int>(blockIdx.x / mt) * kBN;
  const int z = blockIdx.z;
  const int64_t k_lo = static_cast<int64_t>(z) * d_per_split;
  const int64_t k_hi = min(d, k_lo + d_per_split);
  const int warp = threadIdx.x >> 5, wr = warp >> 1, wc = warp & 1;
  const bool do_nsq = NSQ && m0 == 0;  // uniform per block
  const int nrow = threadIdx.x >> 1, nhalf = threadIdx.x & 1;
  float sq = 0.f;

  typename M::Acc acc[2][2];
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 2; ++b) wm::fill_fragment(acc[a][b], 0.f);

  for (int64_t k0 = k_lo; k0 < k_hi; k0 += kBK) {
    const int kv = static_cast<int>(min(static_cast<int64_t>(kBK), k_hi - k0));
    load_tile<T, T, kBM, kBK, kThreads>(ts, LD, Tm + static_cast<int64_t>(m0) * d + k0, d, m - m0, kv, vec);
    load_tile<T, T, kBN, kBK, kThreads>(gs, LD, G + static_cast<int64_t>(n0) * d + k0, d, n - n0, kv, vec);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; kk += M::K) {
      typename M::template FragA<wm::row_major> fa[2];
      typename M::template FragB<wm::col_major> fb[2];  // b(k, j) = G[n0 + j][k0 + k]
#pragma unroll
      for (int a = 0; a < 2; ++a) fa[a].load(ts + (wr * 32 + a * 16) * LD + kk, LD);
#pragma unroll
      for (int b = 0; b < 2; ++b) fb[b].load(gs + (wc * 32 + b * 16) * LD + kk, LD);
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 2; ++b) M::mma(acc[a][b], fa[a], fb[b]);
    }
    if (do_nsq) {  // two threads per G row, 16 columns each
#pragma unroll
      for (int c = 0; c < kBK / 2; ++c) {
        const float v = to_float<T>(gs[nrow * LD + nhalf * (kBK / 2) + c]);
        sq += v * v;
      }
    }
    __syncthreads();
  }

  if (do_nsq) {
    sq += __shfl_xor_sync(0xffffffffu, sq, 1);
    if (nhalf == 0 && n0 + nrow < n) nsq_part[static_cast<int64_t>(z) * n + n0 + nrow] = sq;
  }
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 2; ++b)
      wm::store_matrix_sync(out + (wr * 32 + a * 16) * LDO + wc * 32 + b * 16, acc[a][b], LDO, wm::mem_row_major);
  __syncthreads();
  float* Pz = P_part + static_cast<int64_t>(z) * m * n;
  for (int e = threadIdx.x; e < kBM * kBN; e += kThreads) {
    const int row = e / kBN, col = e % kBN;
    if (m0 + row < m && n0 + col < n) Pz[static_cast<int64_t>(m0 + row) * n + n0 + col] = out[row * LDO + col];
  }
#endif
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    datainf_apply_kernel(const T* __restrict__ Tm, const T* __restrict__ G, const float* __restrict__ P,
                         const float* __restrict__ cinv, const float* __restrict__ rscale,
                         const float* __restrict__ out_scale, float* __restrict__ H, int m, int n, int64_t d,
                         float inv_lam, bool accumulate, bool vec) {
#if FASTINF_OLD_ARCH
  __trap();
#else
  using M = Mma<T>;
  constexpr int LDA = kAK + kPad<T>;  // C tile [kAM][LDA]
  constexpr int LDB = kAD + kPad<T>;  // G tile [kAK][LDB]
  constexpr int LDO = kAD + 4;
  constexpr bool kSplit = !std::is_same<T, float>::value;  // float32: 3xTF32 on the float32 C instead
  __shared__ __align__(128) T cs[kAM * LDA];
  __shared__ __align__(128) T cl[kSplit ? kAM * LDA : 8];
  __shared__ __align__(128) T gs[kAK * LDB];
  __shared__ __align__(128) float out[kAM * LDO];

  const int64_t mt = (m + kAM - 1) / kAM;  // m tiles vary fastest: blocks sharing a G tile are adjacent
  const int m0 = static_cast<int>(blockIdx.x % mt) * kAM;
  const int64_t d0 = static_cast<int64_t>(blockIdx.x / mt) * kAD;
  const int dvalid = static_cast<int>(min(static_cast<int64_t>(kAD), d - d0));
  const int warp = threadIdx.x >> 5, wr = warp >> 1, wc = warp & 1;

  typename M::Acc acc[2][2];
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 2; ++b) wm::fill_fragment(acc[a][b], 0.f);

  for (int k0 = 0; k0 < n; k0 += kAK) {
    const int kv = min(kAK, n - k0);
    for (int e = threadIdx.x; e < kAM * kAK; e += kThreads) {  // C_jk = P[j][k] cinv[k] rscale[j], along k
      const int j = e / kAK, k = e % kAK;
      float v = 0.f;
      if (m0 + j < m && k < kv) v = P[static_cast<int64_t>(m0 + j) * n + k0 + k] * cinv[k0 + k] * rscale[m0 + j];
      const T hi = from_float<T>(v);
      cs[j * LDA + k] = hi;
      if constexpr (kSplit) cl[j * LDA + k] = from_float<T>(v - to_float<T>(hi));
    }
    load_tile<T, T, kAK, kAD, kThreads>(gs, LDB, G + static_cast<int64_t>(k0) * d + d0, d, kv, dvalid, vec);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kAK; kk += M::K) {
      typename M::template FragA<wm::row_major> fa[2];
      typename M::template FragB<wm::row_major> fb[2];
#pragma unroll
      for (int a = 0; a < 2; ++a) fa[a].load(cs + (wr * 32 + a * 16) * LDA + kk, LDA);
#pragma unroll
      for (int b = 0; b < 2; ++b) fb[b].load(gs + kk * LDB + wc * 32 + b * 16, LDB);
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 2; ++b) M::mma(acc[a][b], fa[a], fb[b]);
      if constexpr (kSplit) {  // + lo * G
#pragma unroll
        for (int a = 0; a < 2; ++a) fa[a].load(cl + (wr * 32 + a * 16) * LDA + kk, LDA);
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
          for (int b = 0; b < 2; ++b) M::mma(acc[a][b], fa[a], fb[b]);
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 2; ++b)
      wm::store_matrix_sync(out + (wr * 32 + a * 16) * LDO + wc * 32 + b * 16, acc[a][b], LDO, wm::mem_row_major);
  __syncthreads();
  for (int e = threadIdx.x; e < kAM * kAD; e += kThreads) {
    const int row = e / kAD, col = e % kAD;
    if (m0 + row < m && col < dvalid) {
      const int64_t idx = static_cast<int64_t>(m0 + row) * d + d0 + col;
      const float s = out[row * LDO + col] * out_scale[m0 + row];
      H[idx] = accumulate ? H[idx] - s : to_float<T>(Tm[idx]) * inv_lam - s;
    }
  }
#endif
}

}  // namespace

void datainf_plan_split(int64_t m, int64_t n, int64_t d, int64_t* split, int64_t* d_per_split) {
  // enough blocks for about two waves; each split keeps at least 8 K-steps of work
  const int64_t tiles = ceil_div(m, kBM) * ceil_div(n, kBN);
  const int64_t want = ceil_div(2 * static_cast<int64_t>(device_sm_count()), tiles);
  const int64_t most = ceil_div(d, 8 * kBK) > 0 ? ceil_div(d, 8 * kBK) : 1;
  int64_t s = want < 1 ? 1 : (want > most ? most : want);
  if (s > 65535) s = 65535;
  const int64_t per = ceil_div(ceil_div(d, s), kBK) * kBK;
  *d_per_split = per > 0 ? per : kBK;
  *split = d > 0 ? ceil_div(d, *d_per_split) : 1;
}

void datainf_coef_launch(DType dt, const void* T, const void* G, float* P_part, float* nsq_part, int64_t m,
                         int64_t n, int64_t d, int64_t split, int64_t d_per_split, cudaStream_t stream) {
  if (m == 0 || n == 0) return;
  FASTINF_CHECK(m < (int64_t{1} << 31) && n < (int64_t{1} << 31), "datainf_inverse_sum: m and n must fit in 32 bits");
  FASTINF_CHECK(ceil_div(m, kBM) * ceil_div(n, kBN) < (int64_t{1} << 31) && split <= 65535,
                "datainf_inverse_sum: too many tiles for one call");
  FASTINF_CHECK(d_per_split % kBK == 0, "datainf_inverse_sum: d_per_split must be a multiple of ", kBK);
  dispatch_dtype(dt, [&](auto tag) {
    using E = decltype(tag);
    const bool vec = aligned16(T) && aligned16(G) && (d * static_cast<int64_t>(sizeof(E))) % 16 == 0;
    const dim3 grid(static_cast<unsigned>(ceil_div(m, kBM) * ceil_div(n, kBN)), 1, static_cast<unsigned>(split));
    if (nsq_part != nullptr) {
      datainf_coef_kernel<E, true><<<grid, kThreads, 0, stream>>>(
          static_cast<const E*>(T), static_cast<const E*>(G), P_part, nsq_part, static_cast<int>(m),
          static_cast<int>(n), d, d_per_split, vec);
    } else {
      datainf_coef_kernel<E, false><<<grid, kThreads, 0, stream>>>(
          static_cast<const E*>(T), static_cast<const E*>(G), P_part, nullptr, static_cast<int>(m),
          static_cast<int>(n), d, d_per_split, vec);
    }
    FASTINF_LAUNCH_CHECK();
  });
}

void datainf_apply_launch(DType dt, const void* T, const void* G, const float* P, const float* cinv,
                          const float* rscale, const float* out_scale, float* H, int64_t m, int64_t n, int64_t d,
                          float inv_lam, bool accumulate, cudaStream_t stream) {
  if (m == 0 || d == 0) return;
  FASTINF_CHECK(m < (int64_t{1} << 31) && n < (int64_t{1} << 31), "datainf_inverse_sum: m and n must fit in 32 bits");
  FASTINF_CHECK(ceil_div(m, kAM) * ceil_div(d, kAD) < (int64_t{1} << 31), "datainf_inverse_sum: too many tiles");
  dispatch_dtype(dt, [&](auto tag) {
    using E = decltype(tag);
    const bool vec = aligned16(G) && (d * static_cast<int64_t>(sizeof(E))) % 16 == 0;
    const dim3 grid(static_cast<unsigned>(ceil_div(m, kAM) * ceil_div(d, kAD)));
    datainf_apply_kernel<E><<<grid, kThreads, 0, stream>>>(static_cast<const E*>(T), static_cast<const E*>(G), P, cinv,
                                                           rscale, out_scale, H, static_cast<int>(m),
                                                           static_cast<int>(n), d, inv_lam, accumulate, vec);
    FASTINF_LAUNCH_CHECK();
  });
}

}  // namespace fastinf
