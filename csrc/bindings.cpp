// Python bindings of the CUDA kernels: tensors in, launchers (launchers.h) called on the current stream.
// The Python side (fastinf/_ext/ops.py) validates the op contract, unifies dtypes and orchestrates; these
// functions check what the launchers rely on (device, dtype, shapes) and allocate outputs / workspaces.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "checks.h"
#include "launchers.h"

namespace {

using fastinf::DType;

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

DType dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      FASTINF_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return DType::kFloat32;
}

void check_same(const at::Tensor& a, const at::Tensor& b, const char* name) {
  FASTINF_CHECK(a.scalar_type() == b.scalar_type(), name, " must have dtype ", a.scalar_type(), ", got ",
                b.scalar_type());
  FASTINF_CHECK(a.device() == b.device(), name, " must be on ", a.device(), ", got ", b.device());
}

// (pB (N, splits, dout, r), vp (N, T, S, r)) float32: gB split partials and the pieces of v = dy B.
std::vector<at::Tensor> lora_dy(at::Tensor dy, at::Tensor u, at::Tensor B, at::Tensor eu, int64_t splits,
                                int64_t s_per) {
  FASTINF_CHECK_CUDA(dy);
  const c10::cuda::CUDAGuard guard(dy.device());
  const DType dt = dtype_code(dy, "dy");
  check_same(dy, u, "u");
  check_same(dy, B, "B");
  FASTINF_CHECK(dy.dim() == 3 && u.dim() == 3 && B.dim() == 2, "lora_dy: bad ranks");
  const int64_t N = dy.size(0), S = dy.size(1), dout = dy.size(2), r = B.size(1);
  FASTINF_CHECK(u.size(0) == N && u.size(1) == S && u.size(2) == r && B.size(0) == dout && eu.numel() == N,
                "lora_dy: shapes do not match");
  FASTINF_CHECK(eu.scalar_type() == at::kFloat && eu.device() == dy.device(), "lora_dy: eu must be float32");
  dy = dy.contiguous();
  u = u.contiguous();
  B = B.contiguous();
  eu = eu.contiguous();
  const int64_t tile = fastinf::lora_dy_tile(dt);
  const int64_t T = std::max<int64_t>(1, (dout + tile - 1) / tile);
  const auto opts = dy.options().dtype(at::kFloat);
  const bool run = N > 0 && S > 0 && r > 0 && dout > 0;
  at::Tensor pB = run ? at::empty({N, splits, dout, r}, opts) : at::zeros({N, splits, dout, r}, opts);
  at::Tensor vp = run ? at::empty({N, T, S, r}, opts) : at::zeros({N, T, S, r}, opts);
  fastinf::lora_dy_launch(dt, dy.data_ptr(), u.data_ptr(), B.data_ptr(), eu.data_ptr<float>(), pB.data_ptr<float>(),
                          vp.data_ptr<float>(), N, S, dout, r, splits, s_per, stream());
  return {pB, vp};
}

// pA (N, splits, r, din) float32: gA split partials.
at::Tensor lora_x(at::Tensor x, at::Tensor v, at::Tensor ev, int64_t splits, int64_t s_per) {
  FASTINF_CHECK_CUDA(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const DType dt = dtype_code(x, "x");
  check_same(x, v, "v");
  FASTINF_CHECK(x.dim() == 3 && v.dim() == 3, "lora_x: bad ranks");
  const int64_t N = x.size(0), S = x.size(1), din = x.size(2), r = v.size(2);
  FASTINF_CHECK(v.size(0) == N && v.size(1) == S && ev.numel() == N, "lora_x: shapes do not match");
  FASTINF_CHECK(ev.scalar_type() == at::kFloat && ev.device() == x.device(), "lora_x: ev must be float32");
  x = x.contiguous();
  v = v.contiguous();
  ev = ev.contiguous();
  const auto opts = x.options().dtype(at::kFloat);
  const bool run = N > 0 && S > 0 && r > 0 && din > 0;
  at::Tensor pA = run ? at::empty({N, splits, r, din}, opts) : at::zeros({N, splits, r, din}, opts);
  fastinf::lora_x_launch(dt, x.data_ptr(), v.data_ptr(), ev.data_ptr<float>(), pA.data_ptr<float>(), N, S, din, r,
                         splits, s_per, stream());
  return pA;
}

// (P (m, n) float32 = T G^T, nsq (n,) float32 = row sums of squares of G, or an undefined tensor).
std::vector<at::Tensor> datainf_coef(at::Tensor G, at::Tensor T, bool compute_nsq) {
  FASTINF_CHECK_CUDA(G);
  const c10::cuda::CUDAGuard guard(G.device());
  const DType dt = dtype_code(G, "G");
  check_same(G, T, "T");
  FASTINF_CHECK(G.dim() == 2 && T.dim() == 2 && G.size(1) == T.size(1), "datainf_coef: G (n, d) and T (m, d)");
  G = G.contiguous();
  T = T.contiguous();
  const int64_t n = G.size(0), d = G.size(1), m = T.size(0);
  int64_t split = 1, per = 0;
  fastinf::datainf_plan_split(m, n, d, &split, &per);
  const auto opts = G.options().dtype(at::kFloat);
  at::Tensor P = at::empty({split, m, n}, opts);
  at::Tensor nsq;
  if (compute_nsq) nsq = at::empty({split, n}, opts);
  if (d == 0) {
    P.zero_();
    if (compute_nsq) nsq.zero_();
  } else {
    fastinf::datainf_coef_launch(dt, T.data_ptr(), G.data_ptr(), P.data_ptr<float>(),
                                 compute_nsq ? nsq.data_ptr<float>() : nullptr, m, n, d, split, per, stream());
  }
  at::Tensor Psum = split == 1 ? P.squeeze(0) : P.sum(0);
  at::Tensor nsum = compute_nsq ? (split == 1 ? nsq.squeeze(0) : nsq.sum(0)) : at::Tensor();
  return {Psum, nsum};
}

// H (m, d) float32, written in place: T * inv_lam - (C G) * out_scale, or H -= (C G) * out_scale, with
// C = P * cinv * rscale (see launchers.h).
void datainf_apply(at::Tensor G, at::Tensor T, at::Tensor P, at::Tensor cinv, at::Tensor rscale, at::Tensor out_scale,
                   at::Tensor H, double inv_lam, bool accumulate) {
  FASTINF_CHECK_CUDA(G);
  const c10::cuda::CUDAGuard guard(G.device());
  const DType dt = dtype_code(G, "G");
  check_same(G, T, "T");
  FASTINF_CHECK_INPUT(P);
  FASTINF_CHECK_INPUT(cinv);
  FASTINF_CHECK_INPUT(rscale);
  FASTINF_CHECK_INPUT(out_scale);
  FASTINF_CHECK_INPUT(H);
  FASTINF_CHECK(P.scalar_type() == at::kFloat && cinv.scalar_type() == at::kFloat && H.scalar_type() == at::kFloat &&
                    rscale.scalar_type() == at::kFloat && out_scale.scalar_type() == at::kFloat,
                "datainf_apply: P, cinv, rscale, out_scale and H must be float32");
  G = G.contiguous();
  T = T.contiguous();
  const int64_t n = G.size(0), d = G.size(1), m = T.size(0);
  FASTINF_CHECK(P.size(0) == m && P.size(1) == n && cinv.numel() == n && H.size(0) == m && H.size(1) == d &&
                    rscale.numel() == m && out_scale.numel() == m,
                "datainf_apply: shapes do not match");
  fastinf::datainf_apply_launch(dt, T.data_ptr(), G.data_ptr(), P.data_ptr<float>(), cinv.data_ptr<float>(),
                                rscale.data_ptr<float>(), out_scale.data_ptr<float>(), H.data_ptr<float>(), m, n, d,
                                static_cast<float>(inv_lam), accumulate, stream());
}

// omega (n, m) float32 contiguous, updated in place over all steps in one launch.
void rrinf_updates(at::Tensor rows, at::Tensor targets, at::Tensor lr, at::Tensor omega, double reg,
                   int64_t batch_size) {
  FASTINF_CHECK_CUDA(rows);
  const c10::cuda::CUDAGuard guard(rows.device());
  const DType dt = dtype_code(rows, "rows");
  check_same(rows, targets, "targets");
  FASTINF_CHECK_INPUT(omega);
  FASTINF_CHECK_INPUT(lr);
  FASTINF_CHECK(omega.scalar_type() == at::kFloat && lr.scalar_type() == at::kFloat,
                "rrinf_updates: omega and lr must be float32");
  rows = rows.contiguous();
  targets = targets.contiguous();
  const int64_t n = rows.size(1), m = targets.size(1);
  FASTINF_CHECK(batch_size >= 1 && rows.size(0) % batch_size == 0, "rrinf_updates: bad batch_size");
  const int64_t steps = rows.size(0) / batch_size;
  FASTINF_CHECK(omega.size(0) == n && omega.size(1) == m && lr.numel() == steps && targets.size(0) == rows.size(0),
                "rrinf_updates: shapes do not match");
  const int64_t wsn = fastinf::rrinf_workspace_floats(n, m, batch_size);
  at::Tensor ws;
  if (wsn > 0) ws = at::empty({wsn}, omega.options());
  fastinf::rrinf_row_updates_launch(dt, rows.data_ptr(), targets.data_ptr(), lr.data_ptr<float>(),
                                    omega.data_ptr<float>(), wsn > 0 ? ws.data_ptr<float>() : nullptr, n, m, steps,
                                    batch_size, static_cast<float>(reg), stream());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastinf CUDA kernels (see fastinf/_ext/ops.py for the Python-level contracts)";
  m.def("lora_dy", &lora_dy, "LoRA: gB split partials and the pieces of v = dy B (reads dy once)", py::arg("dy"),
        py::arg("u"), py::arg("B"), py::arg("eu"), py::arg("splits"), py::arg("s_per"));
  m.def(
      "lora_tiles",
      [](at::Tensor x) {
        return std::vector<int64_t>{fastinf::lora_dy_tile(dtype_code(x, "x")), fastinf::lora_x_tile()};
      },
      "(d_out tile of the dy kernel, d_in tile of the x kernel) for x's dtype", py::arg("x"));
  m.def("lora_x", &lora_x, "LoRA: gA split partials (reads x once)", py::arg("x"), py::arg("v"), py::arg("ev"),
        py::arg("splits"), py::arg("s_per"));
  m.def("datainf_coef", &datainf_coef, "DataInf pass 1: P = T G^T and |g_i|^2", py::arg("G"), py::arg("T"),
        py::arg("compute_nsq"));
  m.def("datainf_apply", &datainf_apply, "DataInf pass 2: H = T / lam - (C G) out_scale", py::arg("G"),
        py::arg("T"), py::arg("P"), py::arg("cinv"), py::arg("rscale"), py::arg("out_scale"), py::arg("H"),
        py::arg("inv_lam"), py::arg("accumulate"));
  m.def("rrinf_updates", &rrinf_updates, "RRInf row updates, all steps in one launch", py::arg("rows"),
        py::arg("targets"), py::arg("lr"), py::arg("omega"), py::arg("reg"), py::arg("batch_size"));
}
