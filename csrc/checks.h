// Error-checking macros shared by the CUDA sources and the bindings.
//
// Only c10's CUDA exception header is pulled in (not ATen/cuda/CUDAContext.h), so that the .cu files
// compile with a CPU-only torch wheel's headers in the nvcc compile check (tests/ops/test_cuda_compile.py).
#pragma once

#include <c10/cuda/CUDAException.h>

// Check a CUDA runtime call; throws c10::Error (a Python RuntimeError) with the CUDA error string.
#define FASTINF_CUDA_CHECK(call) C10_CUDA_CHECK(call)

// Check the last kernel launch (bad configuration, too much shared memory, ...).
#define FASTINF_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()

// Argument checks with a message that names the op and the argument (TORCH_CHECK raises RuntimeError).
#define FASTINF_CHECK(cond, ...) TORCH_CHECK(cond, "fastinf: ", __VA_ARGS__)
#define FASTINF_CHECK_CUDA(t) FASTINF_CHECK((t).is_cuda(), #t " must be a CUDA tensor")
#define FASTINF_CHECK_CONTIGUOUS(t) FASTINF_CHECK((t).is_contiguous(), #t " must be contiguous")
#define FASTINF_CHECK_INPUT(t) \
  FASTINF_CHECK_CUDA(t);       \
  FASTINF_CHECK_CONTIGUOUS(t)
