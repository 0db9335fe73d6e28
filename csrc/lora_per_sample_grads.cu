// Per-example LoRA gradients, reading x and dy once each (METHODS.md, fastinf/ops/lora_per_sample_grads.py):
//   gB_i = scale sum_s m_is dy_is u_is^T   (d_out, r)        u = A x (the capture hook's lora_A output)
//   gA_i = scale sum_s m_is v_is x_is^T    (r, d_in)         v = B^T dy
// The same plan as fastinf/kernels/lora_per_sample_grads.py, two launches:
//   lora_dy_kernel: one block per (example i, 128 columns of d_out (64 in float32), rank tile, split of S). It streams its dy
//     tile over S once (kCS rows per step, through shared memory) and forms on the tensor cores both gB's tile
//     (dy^T u_op, accumulated over S in registers) and the tile's piece of v = dy B (written to a float32
//     (N, ceil(d_out/tile), S, r) buffer that the host sums in a fixed order).
//   lora_x_kernel: one block per (example i, kBD columns of d_in, rank tile, split of S) streams its x tile over
//     S once and accumulates gA's tile = v_op^T x.
// u_op and v_op are u*w and v*w (w = scale * mask) scaled per example by an exact power of two and rounded to
// the input type by the host glue (fastinf/kernels/_common.py); the epilogue multiplies the power back.
// Ranks up to kR = 64 sit in one tile (x and dy read once); larger ranks are tiled on the grid (inputs read
// ceil(r / 64) times; the Triton kernel keeps any rank in one tile). S is split only to fill the GPU (the
// split count depends on N and the tiles, not on S; partials summed afterwards: deterministic, no atomics).
// Every block index is on grid axis x (N is not limited to 65535).
#include "common.cuh"

namespace fastinf {
namespace {

constexpr int kThreads = 128;  // 4 warps (x kernel)
constexpr int kCS = 32;        // rows of S per step
constexpr int kBD = 64;        // width of one d_in tile of the x kernel: 4 warps x 16
constexpr int kLDS = 16 + 4;   // per-warp float staging: [16][kLDS]

// d_out tile of the dy kernel: 128 columns (8 warps x 16) for 16-bit inputs, so that v's pieces cost r/128 * 4
// bytes per dy element; 64 (4 warps) for float32, whose tiles would not fit in 48 KB of static shared memory.
template <typename T>
__host__ __device__ constexpr int dy_tile() {
  return sizeof(T) == 4 ? 64 : 128;
}

template <typename T, int kR>
__global__ void __launch_bounds__(dy_tile<T>() * 2)
    lora_dy_kernel(const T* __restrict__ dy, const T* __restrict__ u, const T* __restrict__ B,
                   const float* __restrict__ eu, float* __restrict__ pB, float* __restrict__ vp, int S, int dout,
                   int r, int n_tiles, int n_rtiles, int n_splits, int s_per, bool vec_dy, bool vec_u, bool vec_b) {
#if FASTINF_OLD_ARCH
  __trap();
#else
  using M = Mma<T>;
  constexpr int BD = dy_tile<T>();
  constexpr int NW = BD / 16;        // warps: 16 rows of the gB tile each
  constexpr int NT = NW * 32;
  constexpr int LD = BD + kPad<T>;   // dy tile [kCS][LD]
  constexpr int LDR = kR + kPad<T>;  // u tile [kCS][LDR], B tile [BD][LDR]
  constexpr int FR = kR / 16;
  __shared__ __align__(128) T ys[kCS * LD];
  __shared__ __align__(128) T us[kCS * LDR];
  __shared__ __align__(128) T bs[BD * LDR];
  __shared__ __align__(128) float stage[NW * 16 * kLDS];

  int64_t bid = blockIdx.x;
  const int t = static_cast<int>(bid % n_tiles);  // d tiles of one example adjacent: u_i served from L2
  bid /= n_tiles;
  const int rt = static_cast<int>(bid % n_rtiles);
  bid /= n_rtiles;
  const int p = static_cast<int>(bid % n_splits);
  const int64_t i = bid / n_splits;
  const int d0 = t * BD, r0 = rt * kR;
  const int dv = min(BD, dout - d0), rv = min(kR, r - r0);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int s_lo = p * s_per, s_hi = min(S, s_lo + s_per);
  const T* yb = dy + i * S * dout;
  const T* ub = u + i * S * r;
  float* vb = vp + (i * n_tiles + t) * S * r;
  float* st = stage + warp * 16 * kLDS;

  load_tile<T, T, BD, kR, NT>(bs, LDR, B + static_cast<int64_t>(d0) * r + r0, r, dv, rv, vec_b);
  typename M::Acc acc[FR];
#pragma unroll
  for (int f = 0; f < FR; ++f) wm::fill_fragment(acc[f], 0.f);

  for (int s0 = s_lo; s0 < s_hi; s0 += kCS) {
    const int rows = min(kCS, s_hi - s0);
    load_tile<T, T, kCS, BD, NT>(ys, LD, yb + static_cast<int64_t>(s0) * dout + d0, dout, rows, dv, vec_dy);
    load_tile<T, T, kCS, kR, NT>(us, LDR, ub + static_cast<int64_t>(s0) * r + r0, r, rows, rv, vec_u);
    __syncthreads();
    // gB[d0 + 16w .., r0 ..] += dy^T u_op: a(i, k) = dy[k][16w + i], the dy tile read column-major
#pragma unroll
    for (int kk = 0; kk < kCS; kk += M::K)
#pragma unroll
      for (int f = 0; f < FR; ++f)
        M::template step<wm::col_major, wm::row_major>(acc[f], ys + kk * LD + warp * 16, LD, us + kk * LDR + f * 16,
                                                       LDR);
    // this tile's piece of v = dy B for the step's rows: (kCS x BD) (BD x kR), 16 x 16 tiles over the warps
    for (int tile = warp; tile < (kCS / 16) * FR; tile += NW) {
      const int rr = tile / FR, cc = tile % FR;
      typename M::Acc va;
      wm::fill_fragment(va, 0.f);
#pragma unroll
      for (int kk = 0; kk < BD; kk += M::K)
        M::template step<wm::row_major, wm::row_major>(va, ys + rr * 16 * LD + kk, LD, bs + kk * LDR + cc * 16, LDR);
      wm::store_matrix_sync(st, va, kLDS, wm::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int row = e >> 4, col = e & 15, s = s0 + rr * 16 + row, c = cc * 16 + col;
        if (s < s_hi && c < rv) vb[static_cast<int64_t>(s) * r + r0 + c] = st[row * kLDS + col];
      }
      __syncwarp();
    }
    __syncthreads();  // ys / us are refilled by the next step
  }

  const float sc = eu[i];
  float* outB = pB + (i * n_splits + p) * static_cast<int64_t>(dout) * r;
#pragma unroll
  for (int f = 0; f < FR; ++f) {
    wm::store_matrix_sync(st, acc[f], kLDS, wm::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) {
      const int row = e >> 4, col = e & 15, dr = warp * 16 + row, c = f * 16 + col;
      if (dr < dv && c < rv) outB[static_cast<int64_t>(d0 + dr) * r + r0 + c] = st[row * kLDS + col] * sc;
    }
    __syncwarp();
  }
#endif
}

template <typename T, int kR>
__global__ void __launch_bounds__(kThreads)
    lora_x_kernel(const T* __restrict__ x, const T* __restrict__ v, const float* __restrict__ ev,
                  float* __restrict__ pA, int S, int din, int r, int n_tiles, int n_rtiles, int n_splits, int s_per,
                  bool vec_x, bool vec_v) {
#if FASTINF_OLD_ARCH
  __trap();
#else
  using M = Mma<T>;
  constexpr int LD = kBD + kPad<T>;  // x tile [kCS][LD]
  constexpr int LDR = kR + kPad<T>;  // v tile [kCS][LDR]
  constexpr int FR = kR / 16;
  __shared__ __align__(128) T xs[kCS * LD];
  __shared__ __align__(128) T vs[kCS * LDR];
  __shared__ __align__(128) float stage[4 * 16 * kLDS];

  int64_t bid = blockIdx.x;
  const int t = static_cast<int>(bid % n_tiles);
  bid /= n_tiles;
  const int rt = static_cast<int>(bid % n_rtiles);
  bid /= n_rtiles;
  const int p = static_cast<int>(bid % n_splits);
  const int64_t i = bid / n_splits;
  const int d0 = t * kBD, r0 = rt * kR;
  const int dv = min(kBD, din - d0), rv = min(kR, r - r0);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int s_lo = p * s_per, s_hi = min(S, s_lo + s_per);
  const T* xb = x + i * S * din;
  const T* vb = v + i * S * r;
  float* st = stage + warp * 16 * kLDS;

  typename M::Acc acc[FR];
#pragma unroll
  for (int f = 0; f < FR; ++f) wm::fill_fragment(acc[f], 0.f);
  for (int s0 = s_lo; s0 < s_hi; s0 += kCS) {
    const int rows = min(kCS, s_hi - s0);
    load_tile<T, T, kCS, kBD, kThreads>(xs, LD, xb + static_cast<int64_t>(s0) * din + d0, din, rows, dv, vec_x);
    load_tile<T, T, kCS, kR, kThreads>(vs, LDR, vb + static_cast<int64_t>(s0) * r + r0, r, rows, rv, vec_v);
    __syncthreads();
    // gA[r0 + 16f .., d0 + 16w ..] += v_op^T x: a(i, k) = v[k][16f + i], the v tile read column-major
#pragma unroll
    for (int kk = 0; kk < kCS; kk += M::K)
#pragma unroll
      for (int f = 0; f < FR; ++f)
        M::template step<wm::col_major, wm::row_major>(acc[f], vs + kk * LDR + f * 16, LDR, xs + kk * LD + warp * 16,
                                                       LD);
    __syncthreads();
  }

  const float sc = ev[i];
  float* outA = pA + (i * n_splits + p) * static_cast<int64_t>(r) * din;
#pragma unroll
  for (int f = 0; f < FR; ++f) {
    wm::store_matrix_sync(st, acc[f], kLDS, wm::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) {
      const int row = e >> 4, col = e & 15, c = f * 16 + row, dc = warp * 16 + col;
      if (c < rv && dc < dv) outA[static_cast<int64_t>(r0 + c) * din + d0 + dc] = st[row * kLDS + col] * sc;
    }
    __syncwarp();
  }
#endif
}

int rank_tile(int64_t r) { return r <= 16 ? 16 : (r <= 32 ? 32 : 64); }

// Call f with std::integral_constant<int, kR> for the rank tile of r.
template <typename F>
void dispatch_rank(int64_t r, F&& f) {
  switch (rank_tile(r)) {
    case 16:
      f(std::integral_constant<int, 16>{});
      break;
    case 32:
      f(std::integral_constant<int, 32>{});
      break;
    default:
      f(std::integral_constant<int, 64>{});
  }
}

void check_sizes(int64_t N, int64_t S, int64_t d, int64_t r, int64_t tiles, int64_t splits, int64_t s_per) {
  FASTINF_CHECK(S < (int64_t{1} << 31) && d < (int64_t{1} << 31) && r < (int64_t{1} << 31),
                "lora_per_sample_grads: S, d and r must fit in 32 bits");
  FASTINF_CHECK(splits >= 1 && s_per >= 1 && splits * s_per >= S, "lora_per_sample_grads: bad split of S");
  const int64_t blocks = N * tiles * ceil_div(r, rank_tile(r)) * splits;
  FASTINF_CHECK(blocks < (int64_t{1} << 31), "lora_per_sample_grads: too many blocks (", blocks, ")");
}

}  // namespace

int64_t lora_x_tile() { return kBD; }

int64_t lora_dy_tile(DType dt) { return dt == DType::kFloat32 ? dy_tile<float>() : dy_tile<__half>(); }

void lora_dy_launch(DType dt, const void* dy, const void* u, const void* B, const float* eu, float* pB, float* vp,
                    int64_t N, int64_t S, int64_t dout, int64_t r, int64_t splits, int64_t s_per,
                    cudaStream_t stream) {
  if (N == 0 || S == 0 || r == 0 || dout == 0) return;
  const int64_t tiles = ceil_div(dout, lora_dy_tile(dt));
  check_sizes(N, S, dout, r, tiles, splits, s_per);
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const int64_t e = sizeof(T);
    const bool vy = aligned16(dy) && (dout * e) % 16 == 0;
    const bool vu = aligned16(u) && (r * e) % 16 == 0;
    const bool vb = aligned16(B) && (r * e) % 16 == 0;
    dispatch_rank(r, [&](auto rk) {
      constexpr int kR = decltype(rk)::value;
      const int64_t rtiles = ceil_div(r, kR);
      const int64_t blocks = N * tiles * rtiles * splits;
      lora_dy_kernel<T, kR><<<static_cast<unsigned>(blocks), dy_tile<T>() * 2, 0, stream>>>(
          static_cast<const T*>(dy), static_cast<const T*>(u), static_cast<const T*>(B), eu, pB, vp,
          static_cast<int>(S), static_cast<int>(dout), static_cast<int>(r), static_cast<int>(tiles),
          static_cast<int>(rtiles), static_cast<int>(splits), static_cast<int>(s_per), vy, vu, vb);
      FASTINF_LAUNCH_CHECK();
    });
  });
}

void lora_x_launch(DType dt, const void* x, const void* v, const float* ev, float* pA, int64_t N, int64_t S,
                   int64_t din, int64_t r, int64_t splits, int64_t s_per, cudaStream_t stream) {
  if (N == 0 || S == 0 || r == 0 || din == 0) return;
  const int64_t tiles = ceil_div(din, kBD);
  check_sizes(N, S, din, r, tiles, splits, s_per);
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const int64_t e = sizeof(T);
    const bool vx = aligned16(x) && (din * e) % 16 == 0;
    const bool vv = aligned16(v) && (r * e) % 16 == 0;
    dispatch_rank(r, [&](auto rk) {
      constexpr int kR = decltype(rk)::value;
      const int64_t rtiles = ceil_div(r, kR);
      const int64_t blocks = N * tiles * rtiles * splits;
      lora_x_kernel<T, kR><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          static_cast<const T*>(x), static_cast<const T*>(v), ev, pA, static_cast<int>(S), static_cast<int>(din),
          static_cast<int>(r), static_cast<int>(tiles), static_cast<int>(rtiles), static_cast<int>(splits),
          static_cast<int>(s_per), vx, vv);
      FASTINF_LAUNCH_CHECK();
    });
  });
}

}  // namespace fastinf
