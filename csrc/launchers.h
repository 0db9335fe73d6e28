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
// x (N, S, din), dy (N, S, dout), A (r, din), B (dout, r): contiguous, element type `dt`.
// mask: (N, S) float32 or nullptr. Writes chunk partial sums (float32, every element written):
//   pA (N, C, r, din) and pB (N, C, dout, r), C = ceil(S / lora_chunk_rows()),
// so that gA = pA.sum(1), gB = pB.sum(1). `scale` and the mask are already applied.
int64_t lora_chunk_rows();
void lora_per_sample_grads_launch(DType dt, const void* x, const void* dy, const void* A, const void* B,
                                  const float* mask, float* pA, float* pB, int64_t N, int64_t S, int64_t din,
                                  int64_t dout, int64_t r, float scale, cudaStream_t stream);

// ---- datainf_inverse_sum -------------------------------------------------------------------------
// Pass 1: P_part[z] = T[:, dz] G[:, dz]^T for the split z of the width d into `split` ranges of
// `d_per_split` columns (float32 (split, m, n)); if nsq_part is not null also the row sums of squares of G
// per split (float32 (split, n)). T (m, d), G (n, d) contiguous, element type `dt`.
// The split of the width that fills the device: sets *split and *d_per_split.
void datainf_plan_split(int64_t m, int64_t n, int64_t d, int64_t* split, int64_t* d_per_split);
void datainf_coef_launch(DType dt, const void* T, const void* G, float* P_part, float* nsq_part, int64_t m,
                         int64_t n, int64_t d, int64_t split, int64_t d_per_split, cudaStream_t stream);
// Pass 2: H = (T - (P * cinv) G) * inv_lam, or H -= ((P * cinv) G) * inv_lam when `accumulate`.
// P (m, n) float32, cinv (n,) float32 (= 1 / ((lam + |g_i|^2) n)), H (m, d) float32.
void datainf_apply_launch(DType dt, const void* T, const void* G, const float* P, const float* cinv, float* H,
                          int64_t m, int64_t n, int64_t d, float inv_lam, bool accumulate, cudaStream_t stream);

// ---- rrinf_row_updates ---------------------------------------------------------------------------
// rows (steps*bsz, n), targets (steps*bsz, m): contiguous, element type `dt`; lr (steps,) float32;
// omega (n, m) float32, updated in place. workspace: float32 of at least rrinf_workspace_floats(...)
// elements (may be null when that is 0).
int64_t rrinf_workspace_floats(int64_t n, int64_t m, int64_t bsz);
void rrinf_row_updates_launch(DType dt, const void* rows, const void* targets, const float* lr, float* omega,
                              float* workspace, int64_t n, int64_t m, int64_t steps, int64_t bsz, float reg,
                              cudaStream_t stream);

}  // namespace fastinf
