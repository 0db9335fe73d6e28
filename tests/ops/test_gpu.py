"""Tier (c): the CUDA and Triton kernels against the PyTorch references on a real GPU (skipped without one).

Fresh random inputs on every run (the seed is in the failure message). Each result is compared with the
float64 reference on the same (low-precision) inputs, and the tolerance comes from the error that the
reference formula itself makes in the input precision: the same products computed by PyTorch in float16 /
bfloat16 (tensor-core matmuls with float32 accumulation and 16-bit outputs). A kernel may be up to twice as
far from float64 as that, plus a small floor; float32 inputs (3xTF32 in the kernels) must stay within a
small multiple of the float32 reference's own error. Outputs are checked finite after poisoning the
allocator's memory with NaN, so an unwritten element fails.

Run on a GPU machine with ``TRITON_INTERPRET=0 pytest -m gpu tests/ops/test_gpu.py`` (bench/gpu_check.sh).
"""

from __future__ import annotations

import os

import pytest
import torch

from fastinf import ops
from fastinf.ops import _dispatch
from fastinf.testing import assert_within_reference_error, poison_cuda_cache, rel_err, require_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 2e-6, torch.float16: 2e-4, torch.bfloat16: 1e-3}


def _check(got: torch.Tensor, exact: torch.Tensor, lowp_err: float, dtype: torch.dtype, what: str, seed: int):
    assert_within_reference_error(got, exact, lowp_err, factor=2.0, floor=FLOOR[dtype], what=what, seed=seed)


# ------------------------------------------------------------------------------------------------- LoRA
def _lora_lowp(x, dy, A, B, scale, mask):
    """The reference formula evaluated in the inputs' precision (float32 inputs: the float32 reference)."""
    dt = x.dtype
    if dt == torch.float32:
        return ops.lora_per_sample_grads_reference(x, dy, A, B, scale, mask)
    dym = dy * mask.to(dt)[..., None] if mask is not None else dy
    u = x @ A.to(dt).T
    v = dym @ B.to(dt)
    return torch.bmm(v.transpose(1, 2), x) * scale, torch.bmm(dym.transpose(1, 2), u) * scale  # (gA, gB)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 130, 200, 136, 8, True), (2, 64, 256, 512, 20, False), (1, 7, 40, 24, 1, True)])
def test_lora_per_sample_grads(backend, dtype, shape, fresh_seed):
    b = require_backend(backend)
    N, S, din, dout, r, masked = shape
    x = torch.randn(N, S, din, device="cuda").to(dtype)
    dy = torch.randn(N, S, dout, device="cuda").to(dtype)
    A = torch.randn(r, din, device="cuda") / din**0.5
    B = torch.randn(dout, r, device="cuda")
    mask = (torch.rand(N, S, device="cuda") > 0.25) if masked else None
    exact = ops.lora_per_sample_grads_reference(
        x.double(), dy.double(), A.to(dtype).double(), B.to(dtype).double(), 0.5, mask, return_sq_norms=True
    )
    lowp = _lora_lowp(x, dy, A, B, 0.5, mask)
    poison_cuda_cache()
    got = ops.lora_per_sample_grads(x, dy, A, B, 0.5, mask, return_sq_norms=True, backend=b)
    assert all(t.dtype == torch.float32 for t in got)
    # exact uses A, B rounded to the input dtype, as the kernels read them in that precision
    err_a, err_b = rel_err(lowp[0], exact[0]), rel_err(lowp[1], exact[1])
    _check(got[0], exact[0], err_a, dtype, f"{b} gA", fresh_seed)
    _check(got[1], exact[1], err_b, dtype, f"{b} gB", fresh_seed)
    _check(got[2], exact[2], 2 * (err_a + err_b), dtype, f"{b} squared norms", fresh_seed)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", [1, 20, 64, 100])
def test_lora_hooked_u_and_ranks(backend, dtype, r, fresh_seed):
    """u = A x passed in (as the capture hook records it) gives the same gradients; ranks over one tile."""
    b = require_backend(backend)
    x = torch.randn(2, 70, 96, device="cuda").to(dtype)
    dy = torch.randn(2, 70, 80, device="cuda").to(dtype)
    A = (torch.randn(r, 96, device="cuda") / 96**0.5).to(dtype)
    B = torch.randn(80, r, device="cuda").to(dtype)
    u = x @ A.T  # in the input dtype, like the model's lora_A output
    exact = ops.lora_per_sample_grads_reference(x.double(), dy.double(), A.double(), B.double(), 2.0, u=u)
    lowp = _lora_lowp(x, dy, A, B, 2.0, None)
    got = ops.lora_per_sample_grads(x, dy, A, B, 2.0, u=u, backend=b)
    for k, what in ((0, "gA"), (1, "gB")):
        _check(got[k], exact[k], rel_err(lowp[k], exact[k]), dtype, f"{b} {what} (u given, r={r})", fresh_seed)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_lora_more_than_65535_examples(backend):
    b = require_backend(backend)
    N = 70_000
    x, dy = torch.randn(N, 3, 16, device="cuda"), torch.randn(N, 3, 24, device="cuda")
    A, B = torch.randn(4, 16, device="cuda"), torch.randn(24, 4, device="cuda")
    got = ops.lora_per_sample_grads(x, dy, A, B, backend=b)
    ref = ops.lora_per_sample_grads_reference(x.double(), dy.double(), A.double(), B.double())
    assert max(rel_err(got[0], ref[0]), rel_err(got[1], ref[1])) < 1e-5


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lora_tiny_dy(backend, dtype):
    """Realistic dy ≈ 1e-6 (tests/ops/test_numerics.py on the real kernels): fp16 v = Bᵀdy is scaled first."""
    from test_numerics import LORA_BOUND, _lora_problem

    b = require_backend(backend)
    x, dy, A, B, mask, exact = _lora_problem(dtype)
    got = ops.lora_per_sample_grads(x.cuda(), dy.cuda(), A.cuda(), B.cuda(), 0.5, mask.cuda(), backend=b)
    bound = 2 * LORA_BOUND if dtype == torch.float16 else 1.6e-2
    for k in range(2):
        assert rel_err(got[k].cpu(), exact[k]) < bound, (b, dtype, k)


# ---------------------------------------------------------------------------------------------- DataInf
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cos", [0.999, 0.99999])
def test_datainf_near_collinear(backend, dtype, cos):
    """Near-collinear gradients under the auto damping (tests/ops/test_numerics.py on the real kernels)."""
    from test_numerics import SCORE_BOUND, _datainf_problem, _score_err

    b = require_backend(backend)
    G, T, lam, exact = _datainf_problem(dtype, cos)
    got = ops.datainf_inverse_sum(G.cuda(), T.cuda(), lam, backend=b).cpu()
    assert _score_err(got, exact, G) < 2 * SCORE_BOUND[dtype], (b, dtype, cos)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_datainf_width_over_65535_tiles(backend):
    """d > 65535·64: the grids are linear (the CUDA launch raised here before)."""
    b = require_backend(backend)
    d = 65535 * 64 + 100
    G, T = torch.randn(3, d, device="cuda", dtype=torch.float16), torch.randn(2, d, device="cuda", dtype=torch.float16)
    got = ops.datainf_inverse_sum(G, T, 5.0, backend=b)
    assert rel_err(got, ops.datainf_inverse_sum_reference(G.double(), T.double(), 5.0)) < 1e-5


def _datainf_lowp(G, T, lam):
    dt = G.dtype
    if dt == torch.float32:
        return ops.datainf_inverse_sum_reference(G, T, lam)
    n = G.shape[0]
    nsq = G.float().pow(2).sum(1)
    C = ((T @ G.T).float() / (lam + nsq)).to(dt)
    return (T.float() - (C @ G).float() / n) / lam


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(300, 1024, 70, None), (129, 1031, 1, None), (257, 520, 17, 100)])
def test_datainf_inverse_sum(backend, dtype, shape, fresh_seed):
    b = require_backend(backend)
    n, d, m, chunk = shape
    G = (torch.randn(n, d, device="cuda") * torch.rand(n, 1, device="cuda")).to(dtype)
    T = torch.randn(m, d, device="cuda").to(dtype)
    lam = 0.1 * float(G.float().pow(2).mean())  # the default damping rule
    exact = ops.datainf_inverse_sum_reference(G.double(), T.double(), lam)
    lowp_err = rel_err(_datainf_lowp(G, T, lam), exact)
    poison_cuda_cache()
    got = ops.datainf_inverse_sum(G, T, lam, chunk_size=chunk, backend=b)
    assert got.dtype == torch.float32
    _check(got, exact, lowp_err, dtype, f"{b} H", fresh_seed)
    sq = G.double().pow(2).sum(1)
    got2 = ops.datainf_inverse_sum(G, T, lam, sq_norms=sq, backend=b)
    _check(got2, exact, lowp_err, dtype, f"{b} H (given norms)", fresh_seed)


# ------------------------------------------------------------------------------------------------ RRInf
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape",
    [(300, 33, 1, 1), (400, 1000, 100, 4), (200, 5000, 300, 1), (50, 70000, 3, 2)],
    ids=["tiny", "batched", "n5000-m300", "n70000"],
)
def test_rrinf_row_updates(backend, dtype, shape, fresh_seed):
    b = require_backend(backend)
    T, n, m, bsz = shape
    if b == "triton" and n > 16384:
        pytest.skip("the Triton kernel keeps Ω in registers (n ≤ 16384)")
    rows = torch.randn(T, n, device="cuda").to(dtype)
    rows[5] = 0.0
    if bsz > 1:
        rows[2 * bsz : 3 * bsz] = 0.0  # an all-zero step
    targets = (torch.randn(T, m, device="cuda") * n).to(dtype)
    omega = torch.randn(n, m, device="cuda")
    steps = T // bsz
    lr = torch.rand(steps, device="cuda") * 0.02 + 0.001
    exact = ops.rrinf_row_updates_reference(rows.double(), targets.double(), omega.double(), lr.double(), 1e-3, bsz)
    ref32 = ops.rrinf_row_updates_reference(rows, targets, omega, lr, 1e-3, bsz)
    # the kernels keep Ω in float32 like the reference; allow 10x its own float32 error
    lowp_err = 5.0 * rel_err(ref32, exact)
    poison_cuda_cache()
    got = ops.rrinf_row_updates(rows, targets, omega, lr, 1e-3, bsz, backend=b)
    assert got.dtype == torch.float32
    _check(got, exact, lowp_err, torch.float32, f"{b} Ω", fresh_seed)
    got_f = ops.rrinf_row_updates(rows, targets, omega, 0.01, 1e-3, bsz, backend=b)  # lr as a float
    exact_f = ops.rrinf_row_updates_reference(rows.double(), targets.double(), omega.double(), 0.01, 1e-3, bsz)
    ref32_f = ops.rrinf_row_updates_reference(rows, targets, omega, 0.01, 1e-3, bsz)
    _check(got_f, exact_f, 5.0 * rel_err(ref32_f, exact_f), torch.float32, f"{b} Ω (float lr)", fresh_seed)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_rrinf_first_step_from_zero(backend):
    b = require_backend(backend)
    phi, ups = torch.randn(1, 50, device="cuda"), torch.randn(1, 3, device="cuda")
    got = ops.rrinf_row_updates(phi, ups, torch.zeros(50, 3, device="cuda"), 0.01, 0.3, backend=b)
    torch.testing.assert_close(got, 2 * 0.01 * phi[0, :, None] * ups[0][None, :] / phi.pow(2).sum())


# --------------------------------------------------------------------------------------------- dispatch
def test_auto_follows_the_route():
    """auto on a GPU takes the route's first backend that can run (today: the reference, nothing measured yet)."""
    x = torch.randn(4, 64, device="cuda")
    os.environ.pop("FASTINF_BACKEND", None)
    order = _dispatch.route("datainf_inverse_sum", (x, x, 0.1)).order
    want = next(b for b in order if b == "torch" or ops.backends()[b] == "available")
    if want == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1")
    assert _dispatch.select("datainf_inverse_sum", "auto", x.device, (x, x, 0.1), {})[0] == want
    # float64 is not a kernel dtype: auto runs the reference, an explicit kernel backend raises with the reason
    assert _dispatch.select("datainf_inverse_sum", "auto", x.device, (x.double(), x.double(), 0.1), {})[0] == "torch"
    for b in ("cuda", "triton"):
        if ops.backends()[b] == "available" and not (b == "triton" and os.environ.get("TRITON_INTERPRET") == "1"):
            with pytest.raises(RuntimeError, match="float64"):
                ops.datainf_inverse_sum(x.double(), x.double(), 0.1, backend=b)
