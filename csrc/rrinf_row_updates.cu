// RRInf's multi-test normalised SGD on Omega, all steps in one launch (METHODS.md section 5,
// fastinf/ops/rrinf_row_updates.py). For each step, with the step's rows phi_j (batch of bsz):
//   E_j = phi_j^T Omega - y_j,  Omega <- Omega - lr_s (2/c sum_{j: |phi_j| > 0} phi_j E_j / |phi_j|^2 + 2 reg Omega),
// c = number of non-zero rows of the step; a step whose rows are all zero leaves Omega unchanged.
//
// Launch design. Column j of Omega evolves independently of every other column: its update needs only
// phi (shared, read-only), y_j and column j itself. So each block owns CB columns for all steps and no
// grid-wide synchronisation is needed at all; within a block, thread t owns rows t, t + blockDim, ... of
// its columns, so every element of Omega is read and written by one thread only, held in shared memory
// (or in a private global slab when CB n floats do not fit). Per step a block does one pass over phi for
// the dot products and |phi|^2 (one deterministic block reduction per row), one tiny coefficient step,
// and one pass for the update: three barriers per step and no launches. For m = 1 this is the
// cooperative single-block design; for m >= #SMs it fills the GPU with one column per block.
#include "common.cuh"

namespace fastinf {
namespace {

struct RRPlan {
  int cb;             // columns per block (template argument: 1, 2, 4 or 8)
  int threads;        // threads per block
  int blocks;         // ceil(m / cb)
  bool use_smem;      // Omega slab in shared memory (else in the global workspace)
  size_t smem_bytes;  // dynamic shared memory per block
};

RRPlan rrinf_plan(int64_t n, int64_t m, int64_t bsz) {
  RRPlan p{};
  const int64_t sms = device_sm_count();
  p.cb = 1;
  while (p.cb < 8 && ceil_div(m, p.cb) > sms) p.cb *= 2;
  p.blocks = static_cast<int>(ceil_div(m, p.cb));
  int64_t t = ceil_div(ceil_div(n, 4), 32) * 32;  // about four rows per thread
  p.threads = static_cast<int>(t < 64 ? 64 : (t > 1024 ? 1024 : t));
  const int64_t v = p.cb + 1;
  const int64_t base = (32 * v + bsz * v + bsz * p.cb) * static_cast<int64_t>(sizeof(float));
  const int64_t slab = static_cast<int64_t>(p.cb) * n * static_cast<int64_t>(sizeof(float));
  const int64_t limit = device_max_smem_optin();
  FASTINF_CHECK(base <= limit, "rrinf_row_updates: batch_size ", bsz, " is too large for one block's shared memory");
  p.use_smem = base + slab <= limit;
  p.smem_bytes = static_cast<size_t>(p.use_smem ? base + slab : base);
  return p;
}

template <int CB, typename T>
__global__ void __launch_bounds__(1024)
    rrinf_row_updates_kernel(const T* __restrict__ rows, const T* __restrict__ targets, const float* __restrict__ lr,
                             float* __restrict__ omega, float* __restrict__ wglobal, int n, int m, int steps, int bsz,
                             float reg, bool use_smem) {
  extern __shared__ __align__(16) float smem[];
  constexpr int V = CB + 1;
  float* red = smem;                  // [32][V] block-reduction scratch
  float* tot = red + 32 * V;          // [bsz][V]: phi_j . Omega_c for c < CB, then |phi_j|^2
  float* coef = tot + bsz * V;        // [bsz][CB]: 2 E_jc / (|phi_j|^2 c)
  const int col0 = blockIdx.x * CB;
  const int ncols = min(CB, m - col0);
  float* W = use_smem ? coef + bsz * CB : wglobal + static_cast<int64_t>(blockIdx.x) * CB * n;  // [CB][n]
  const int tid = threadIdx.x, nt = blockDim.x;

  for (int k = tid; k < n; k += nt) {
#pragma unroll
    for (int c = 0; c < CB; ++c) W[c * n + k] = c < ncols ? omega[static_cast<int64_t>(k) * m + col0 + c] : 0.f;
  }

  for (int s = 0; s < steps; ++s) {
    const int64_t row0 = static_cast<int64_t>(s) * bsz;
    for (int j = 0; j < bsz; ++j) {
      const T* phi = rows + (row0 + j) * n;
      float acc[V];
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] = 0.f;
      for (int k = tid; k < n; k += nt) {
        const float p = to_float<T>(phi[k]);
        acc[CB] += p * p;
#pragma unroll
        for (int c = 0; c < CB; ++c) acc[c] += p * W[c * n + k];
      }
      block_sum<V>(acc, red, tot + j * V);  // ends past a barrier: tot[j] visible to all
    }
    int cnt = 0;
    for (int j = 0; j < bsz; ++j) cnt += tot[j * V + CB] > 0.f;
    if (cnt == 0) continue;  // uniform across the block: all rows of the step are zero
    for (int q = tid; q < bsz * CB; q += nt) {
      const int j = q / CB, c = q % CB;
      const float nsq = tot[j * V + CB];
      float e = 0.f;
      if (c < ncols) e = tot[j * V + c] - to_float<T>(targets[(row0 + j) * m + col0 + c]);
      coef[q] = nsq > 0.f ? e * (2.f / (nsq * static_cast<float>(cnt))) : 0.f;
    }
    __syncthreads();
    const float lr_s = lr[s], decay = 2.f * reg;
    for (int k = tid; k < n; k += nt) {
      float upd[CB];
#pragma unroll
      for (int c = 0; c < CB; ++c) upd[c] = 0.f;
      for (int j = 0; j < bsz; ++j) {
        if (tot[j * V + CB] > 0.f) {
          const float p = to_float<T>(rows[(row0 + j) * n + k]);
#pragma unroll
          for (int c = 0; c < CB; ++c) upd[c] += p * coef[j * CB + c];
        }
      }
#pragma unroll
      for (int c = 0; c < CB; ++c) {
        const float w = W[c * n + k];
        W[c * n + k] = w - lr_s * (upd[c] + decay * w);
      }
    }
    // no barrier needed here: W is thread-private, and tot/coef are rewritten only after the next step's
    // first block_sum barrier, which every thread reaches only after finishing this update loop
  }

  for (int k = tid; k < n; k += nt) {
#pragma unroll
    for (int c = 0; c < CB; ++c)
      if (c < ncols) omega[static_cast<int64_t>(k) * m + col0 + c] = W[c * n + k];
  }
}

template <int CB, typename T>
void launch_cb(const RRPlan& p, const T* rows, const T* targets, const float* lr, float* omega, float* ws, int64_t n,
               int64_t m, int64_t steps, int64_t bsz, float reg, cudaStream_t stream) {
  auto kernel = rrinf_row_updates_kernel<CB, T>;
  if (p.smem_bytes > 48 * 1024) {
    FASTINF_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(p.smem_bytes)));
  }
  kernel<<<p.blocks, p.threads, p.smem_bytes, stream>>>(rows, targets, lr, omega, ws, static_cast<int>(n),
                                                                   static_cast<int>(m), static_cast<int>(steps),
                                                                   static_cast<int>(bsz), reg, p.use_smem);
  FASTINF_LAUNCH_CHECK();
}

}  // namespace

int64_t rrinf_workspace_floats(int64_t n, int64_t m, int64_t bsz) {
  if (n == 0 || m == 0) return 0;
  const RRPlan p = rrinf_plan(n, m, bsz);
  return p.use_smem ? 0 : static_cast<int64_t>(p.blocks) * p.cb * n;
}

void rrinf_row_updates_launch(DType dt, const void* rows, const void* targets, const float* lr, float* omega,
                              float* workspace, int64_t n, int64_t m, int64_t steps, int64_t bsz, float reg,
                              cudaStream_t stream) {
  if (n == 0 || m == 0 || steps == 0) return;
  FASTINF_CHECK(n < (int64_t{1} << 31) && m < (int64_t{1} << 31) && steps < (int64_t{1} << 31) &&
                    bsz < (int64_t{1} << 31),
                "rrinf_row_updates: sizes must fit in 32 bits");
  const RRPlan p = rrinf_plan(n, m, bsz);
  FASTINF_CHECK(p.use_smem || workspace != nullptr, "rrinf_row_updates: a workspace is needed for n = ", n);
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const T* r = static_cast<const T*>(rows);
    const T* y = static_cast<const T*>(targets);
    switch (p.cb) {
      case 1:
        launch_cb<1, T>(p, r, y, lr, omega, workspace, n, m, steps, bsz, reg, stream);
        break;
      case 2:
        launch_cb<2, T>(p, r, y, lr, omega, workspace, n, m, steps, bsz, reg, stream);
        break;
      case 4:
        launch_cb<4, T>(p, r, y, lr, omega, workspace, n, m, steps, bsz, reg, stream);
        break;
      default:
        launch_cb<8, T>(p, r, y, lr, omega, workspace, n, m, steps, bsz, reg, stream);
        break;
    }
  });
}

}  // namespace fastinf
