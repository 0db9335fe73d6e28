// Error-checking macros shared by the CUDA sources and the bindings.
//
// Plain CUDA runtime + standard library only: no ATen/c10 header is pulled into the .cu files, which keeps
// the nvcc compile check (tests/ops/test_cuda_compile.py) fast (c10's CUDA headers alone cost ~4 s of
// compile time per file) and independent of the torch build. Failures throw std::runtime_error, which
// pybind11 turns into a Python RuntimeError carrying the message.
#pragma once

#include <cuda_runtime.h>

#include <sstream>
#include <stdexcept>
#include <string>

namespace fastinf {
namespace detail {
template <typename... Args>
[[noreturn]] inline void fail(const char* file, int line, const Args&... args) {
  std::ostringstream os;
  os << "fastinf: ";
  (os << ... << args);
  os << " [" << file << ":" << line << "]";
  throw std::runtime_error(os.str());
}
}  // namespace detail
}  // namespace fastinf

// Argument / invariant check with a message built from the remaining arguments.
#define FASTINF_CHECK(cond, ...)                                             \
  do {                                                                       \
    if (!(cond)) ::fastinf::detail::fail(__FILE__, __LINE__, __VA_ARGS__);   \
  } while (0)

// Check a CUDA runtime call; the message carries CUDA's error string and the call.
#define FASTINF_CUDA_CHECK(call)                                                                        \
  do {                                                                                                  \
    const cudaError_t fastinf_err_ = (call);                                                            \
    if (fastinf_err_ != cudaSuccess)                                                                    \
      ::fastinf::detail::fail(__FILE__, __LINE__, "CUDA error: ", cudaGetErrorString(fastinf_err_), \
                              " in ", #call);                                                           \
  } while (0)

// Check the last kernel launch (bad configuration, too much shared memory, ...).
#define FASTINF_LAUNCH_CHECK() FASTINF_CUDA_CHECK(cudaGetLastError())

// Tensor checks (used by the bindings, where at::Tensor is known).
#define FASTINF_CHECK_CUDA(t) FASTINF_CHECK((t).is_cuda(), #t " must be a CUDA tensor")
#define FASTINF_CHECK_CONTIGUOUS(t) FASTINF_CHECK((t).is_contiguous(), #t " must be contiguous")
#define FASTINF_CHECK_INPUT(t) \
  FASTINF_CHECK_CUDA(t);       \
  FASTINF_CHECK_CONTIGUOUS(t)
