// Host launchers of the CUDA kernels: plain pointers, sizes and the stream, no ATen types, so that the .cu
// files need only CUDA headers. The bindings (bindings.cpp) turn tensors into these arguments and pass the
// current c10 CUDA stream. Every launcher runs on the current device and checks its launch.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastinf {

// Element type of the floating-point inputs of a launcher (all of its tensor inputs share it).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---- lora_per_sample_grads ------------------------------------------------------------------------
// dy (N, S, dout), u (N, S, r), B (dout, r), x (N, S, din), v (N, S, r): contiguous, element type `dt`; u and v
// are the glue's scaled operands (u*w / 2^eu_i, v*w / 2^ev_i rounded to `dt`); eu, ev (N,) float32 factors.
// The split of S: `splits` ranges of `s_per` rows (splits * s_per >= S). Every element of the outputs is written:
//   lora_dy_launch: pB (N, splits, dout, r) = 2^eu_i dy^T u per split; vp (N, T, S, r) = dy B per d_out tile,
//                   T = ceil(dout / lora_dy_tile(dt))  (v = vp.sum(1));
//   lora_x_launch:  pA (N, splits, r, din) = 2^ev_i v^T x per split.
int64_t lora_dy_tile(DType dt);
int64_t lora_x_tile();
void lora_dy_launch(DType dt, const void* dy, const void* u, const void* B, const float* eu, float* pB, float* vp,
                    int64_t N, int64_t S, int64_t dout, int64_t r, int64_t splits, int64_t s_per,
                    cudaStream_t stream);
void lora_x_launch(DType dt, const void* x, const void* v, const float* ev, float* pA, int64_t N, int64_t S,
                   int64_t din, int64_t r, int64_t splits, int64_t s_per, cudaStream_t stream);

// ---- datainf_inverse_sum -------------------------------------------------------------------------
// Pass 1: P_part[z] = T[:, dz] G[:, dz]^T for the split z of the width d into `split` ranges of
// `d_per_split` columns (float32 (split, m, n)); if nsq_part is not null also the row sums of squares of G
// per split (float32 (split, n)). T (m, d), G (n, d) contiguous, element type `dt`.
// The split of the width that fills the device: sets *split and *d_per_split.
void datainf_plan_split(int64_t m, int64_t n, int64_t d, int64_t* split, int64_t* d_per_split);
void datainf_coef_launch(DType dt, const void* T, const void* G, float* P_part, float* nsq_part, int64_t m,
                         int64_t n, int64_t d, int64_t split, int64_t d_per_split, cudaStream_t stream);
// Pass 2: with C_ji = P_ji * cinv_i * rscale_j (float32; for 16-bit inputs split into hi + lo in `dt`):
// H = T * inv_lam - (C G) * out_scale_j, or H -= (C G) * out_scale_j when `accumulate`.
// P (m, n) float32, cinv (n,) float32 (= 1 / (lam + |g_i|^2)), rscale, out_scale (m,) float32
// (a power of two, and 1 / (rscale n lam)), H (m, d) float32.
void datainf_apply_launch(DType dt, const void* T, const void* G, const float* P, const float* cinv,
                          const float* rscale, const float* out_scale, float* H, int64_t m, int64_t n, int64_t d,
                          float inv_lam, bool accumulate, cudaStream_t stream);

// ---- rrinf_row_updates ---------------------------------------------------------------------------
// rows (steps*bsz, n), targets (steps*bsz, m): contiguous, element type `dt`; lr (steps,) float32;
// omega (n, m) float32, updated in place. workspace: float32 of at least rrinf_workspace_floats(...)
// elements (may be null when that is 0).
int64_t rrinf_workspace_floats(int64_t n, int64_t m, int64_t bsz);
void rrinf_row_updates_launch(DType dt, const void* rows, const void* targets, const float* lr, float* omega,
                              float* workspace, int64_t n, int64_t m, int64_t steps, int64_t bsz, float reg,
                              cudaStream_t stream);

}  // namespace fastinf
