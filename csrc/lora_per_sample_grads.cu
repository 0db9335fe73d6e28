// Per-example LoRA gradients in one kernel launch (METHODS.md, fastinf/ops/lora_per_sample_grads.py):
//   gB_i = scale sum_s m_is dy_is (A x_is)^T   (d_out, r)
//   gA_i = scale sum_s m_is (B^T dy_is) x_is^T (r, d_in)
//
// One block per (chunk of kCS rows of example i, tile of kR ranks). Phase 1 streams the chunk's x and dy
// tiles through shared memory and forms u = x A^T and v = dy B (kCS x kR, float32 accumulation) on the tensor
// cores, then folds scale and the mask into u and v and keeps them in shared memory. Phase 2 streams the
// same tiles again and writes the chunk's partial gB = dy^T u and gA = v^T x straight to its own slot of the
// output (no atomics: the chunk partials are summed afterwards, so results are deterministic). Nothing but
// x, dy, A, B and the outputs touches global memory: no float32 copies of the inputs, no masked copy of dy,
// no u/v round trip. The second read of a tile usually hits L2 (the chunk was read just before).
#include "common.cuh"

namespace fastinf {
namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr int kCS = 64;        // rows of one chunk: 4 warps x 16
constexpr int kR = 16;         // ranks per block: one WMMA tile
constexpr int kBD = 64;        // width of one d tile: 4 warps x 16

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lora_per_sample_grads_kernel(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ A,
                                 const T* __restrict__ B, const float* __restrict__ mask, float* __restrict__ pA,
                                 float* __restrict__ pB, int S, int din, int dout, int r, float scale, bool vec_x,
                                 bool vec_dy, bool vec_a, bool vec_b) {
#if FASTINF_OLD_ARCH
  __trap();
#else
  using M = Mma<T>;
  constexpr int LD = kBD + kPad<T>;   // x / dy tile: [kCS][LD]; A tile: [kR][LD]
  constexpr int LDR = kR + kPad<T>;   // u, v: [kCS][LDR]; B tile: [kBD][LDR]
  constexpr int LDS = 16 + 4;         // per-warp float staging: [16][LDS]
  constexpr int WS = (kBD * LDR > kR * LD) ? kBD * LDR : kR * LD;
  __shared__ __align__(128) T xs[kCS * LD];
  __shared__ __align__(128) T ws[WS];
  __shared__ __align__(128) T us[kCS * LDR];
  __shared__ __align__(128) T vs[kCS * LDR];
  __shared__ __align__(128) float stage[4 * 16 * LDS];

  const int chunk = blockIdx.x, i = blockIdx.y, r0 = blockIdx.z * kR;
  const int C = gridDim.x;
  const int s0 = chunk * kCS;
  const int rows = min(kCS, S - s0);
  const int rvalid = min(kR, r - r0);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* xb = x + (static_cast<int64_t>(i) * S + s0) * din;
  const T* yb = dy + (static_cast<int64_t>(i) * S + s0) * dout;
  float* st = stage + warp * 16 * LDS;
  typename M::Acc acc;

  // u or v (this warp's 16 rows) -> shared memory as T, times scale and the row's mask (0 past S)
  auto keep = [&](T* dst) {
    wm::store_matrix_sync(st, acc, LDS, wm::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) {
      const int rr = e >> 4, cc = e & 15, s = s0 + warp * 16 + rr;
      const float w = s < S ? (mask != nullptr ? mask[static_cast<int64_t>(i) * S + s] : 1.f) : 0.f;
      dst[(warp * 16 + rr) * LDR + cc] = from_float<T>(st[rr * LDS + cc] * scale * w);
    }
    __syncwarp();
  };

  // ---- phase 1a: u = x A^T (warp w: chunk rows 16w..16w+15)
  wm::fill_fragment(acc, 0.f);
  for (int d0 = 0; d0 < din; d0 += kBD) {
    const int dv = min(kBD, din - d0);
    load_tile<T, T, kCS, kBD, kThreads>(xs, LD, xb + d0, din, rows, dv, vec_x);
    load_tile<T, T, kR, kBD, kThreads>(ws, LD, A + static_cast<int64_t>(r0) * din + d0, din, rvalid, dv, vec_a);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBD; kk += M::K)  // b(k, j) = A[r0 + j][d0 + k]: A's tile read column-major
      M::template step<wm::row_major, wm::col_major>(acc, xs + warp * 16 * LD + kk, LD, ws + kk, LD);
    __syncthreads();
  }
  keep(us);

  // ---- phase 1b: v = dy B
  wm::fill_fragment(acc, 0.f);
  for (int d0 = 0; d0 < dout; d0 += kBD) {
    const int dv = min(kBD, dout - d0);
    load_tile<T, T, kCS, kBD, kThreads>(xs, LD, yb + d0, dout, rows, dv, vec_dy);
    load_tile<T, T, kBD, kR, kThreads>(ws, LDR, B + static_cast<int64_t>(d0) * r + r0, r, dv, rvalid, vec_b);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBD; kk += M::K)
      M::template step<wm::row_major, wm::row_major>(acc, xs + warp * 16 * LD + kk, LD, ws + kk * LDR, LDR);
    __syncthreads();
  }
  keep(vs);
  __syncthreads();  // u and v complete

  // ---- phase 2a: gB[d0 + 16w .., r0 ..] = dy^T u (warp w: 16 rows of the d tile)
  float* outB = pB + (static_cast<int64_t>(i) * C + chunk) * dout * r;
  for (int d0 = 0; d0 < dout; d0 += kBD) {
    const int dv = min(kBD, dout - d0);
    load_tile<T, T, kCS, kBD, kThreads>(xs, LD, yb + d0, dout, rows, dv, vec_dy);
    __syncthreads();
    wm::fill_fragment(acc, 0.f);
#pragma unroll
    for (int kk = 0; kk < kCS; kk += M::K)  // a(i, k) = dy[k][i]: the dy tile read column-major
      M::template step<wm::col_major, wm::row_major>(acc, xs + kk * LD + warp * 16, LD, us + kk * LDR, LDR);
    wm::store_matrix_sync(st, acc, LDS, wm::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) {
      const int rr = e >> 4, cc = e & 15, drow = d0 + warp * 16 + rr;
      if (drow < dout && cc < rvalid) outB[static_cast<int64_t>(drow) * r + r0 + cc] = st[rr * LDS + cc];
    }
    __syncthreads();  // xs and the staging are reused by the next tile
  }

  // ---- phase 2b: gA[r0 .., d0 + 16w ..] = v^T x (warp w: 16 columns of the d tile)
  float* outA = pA + (static_cast<int64_t>(i) * C + chunk) * r * din;
  for (int d0 = 0; d0 < din; d0 += kBD) {
    const int dv = min(kBD, din - d0);
    load_tile<T, T, kCS, kBD, kThreads>(xs, LD, xb + d0, din, rows, dv, vec_x);
    __syncthreads();
    wm::fill_fragment(acc, 0.f);
#pragma unroll
    for (int kk = 0; kk < kCS; kk += M::K)  // a(i, k) = v[k][i]: v read column-major
      M::template step<wm::col_major, wm::row_major>(acc, vs + kk * LDR, LDR, xs + kk * LD + warp * 16, LD);
    wm::store_matrix_sync(st, acc, LDS, wm::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) {
      const int rr = e >> 4, cc = e & 15, dcol = d0 + warp * 16 + cc;
      if (rr < rvalid && dcol < din) outA[static_cast<int64_t>(r0 + rr) * din + dcol] = st[rr * LDS + cc];
    }
    __syncthreads();
  }
#endif
}

}  // namespace

int64_t lora_chunk_rows() { return kCS; }

void lora_per_sample_grads_launch(DType dt, const void* x, const void* dy, const void* A, const void* B,
                                  const float* mask, float* pA, float* pB, int64_t N, int64_t S, int64_t din,
                                  int64_t dout, int64_t r, float scale, cudaStream_t stream) {
  if (N == 0 || S == 0 || r == 0) return;
  FASTINF_CHECK(N <= 65535, "lora_per_sample_grads: at most 65535 examples per call, got ", N);
  FASTINF_CHECK(ceil_div(r, kR) <= 65535, "lora_per_sample_grads: rank ", r, " is too large");
  FASTINF_CHECK(S < (int64_t{1} << 31) && din < (int64_t{1} << 31) && dout < (int64_t{1} << 31),
                "lora_per_sample_grads: dimensions must fit in 32 bits");
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const int64_t e = sizeof(T);
    const bool vx = aligned16(x) && (din * e) % 16 == 0;
    const bool vy = aligned16(dy) && (dout * e) % 16 == 0;
    const bool va = aligned16(A) && (din * e) % 16 == 0;
    const bool vb = aligned16(B) && (r * e) % 16 == 0;
    const dim3 grid(static_cast<unsigned>(ceil_div(S, kCS)), static_cast<unsigned>(N),
                    static_cast<unsigned>(ceil_div(r, kR)));
    lora_per_sample_grads_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(dy), static_cast<const T*>(A), static_cast<const T*>(B), mask,
        pA, pB, static_cast<int>(S), static_cast<int>(din), static_cast<int>(dout), static_cast<int>(r), scale, vx, vy,
        va, vb);
    FASTINF_LAUNCH_CHECK();
  });
}

}  // namespace fastinf
