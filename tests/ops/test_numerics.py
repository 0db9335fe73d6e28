"""Numerics of the kernels' rounding plans against float64, where low precision bites (issue 10).

* DataInf with near-collinear gradients under the 'auto' damping (λ = 0.1 × mean squared entry): the
  preconditioned test vectors H = (T − C G/n)/λ cancel almost completely, so the error of C shows in the scores
  H Gᵀ. The kernels keep C in float32 (hi + lo 16-bit parts on the tensor cores, a per-row power of two) and
  apply 1/n and 1/λ in the epilogue.
* LoRA in float16 with dy ≈ 1e-6: v = Bᵀ dy ≈ 1e-5 lies below float16's smallest normal (6.1e-5); the kernels
  scale u and v per example by a power of two before rounding them.

How, on a CPU: bfloat16 cannot be run by the Triton interpreter (the launchers upcast it), so bf16 is checked
through ``fastinf.kernels._emulate`` — the kernels' rounding plan evaluated in float64 with the same roundings
— held against the float64 formula; float16 and float32 run through the Triton kernels under
TRITON_INTERPRET=1 (real float16 roundings), against float64 and against the emulation. Every test also
evaluates the previous plan (``plan="previous"``) and asserts that it fails the same bound, so the bounds can
fail. On a GPU, tests/ops/test_gpu.py runs the same scenarios on the real kernels (both backends, bf16 too).

The exact answer is always the float64 formula on the same (rounded) inputs, never a low-precision reference.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastinf import ops
from fastinf.kernels._emulate import datainf_emulated, lora_emulated
from fastinf.testing import rel_err

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.runtime.interpreter")
interp = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 set before triton is imported"
)

# bound on ‖scores − exact‖/‖exact‖ (scores = H Gᵀ) at the most collinear setting: the kernel plan's
# emulated error is 3.6e-5 (bf16) / 2.2e-5 (fp16); the previous plan's 2.6e-2 / 3.9e-3
SCORE_BOUND = {torch.bfloat16: 2e-4, torch.float16: 1e-4, torch.float32: 1e-5}


def collinear(n: int, d: int, cos: float, seed: int) -> torch.Tensor:
    """n rows at mean pairwise cosine ≈ ``cos`` (a shared direction plus small noise), norms in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(d, generator=g, dtype=torch.float64)
    e /= e.norm()
    eps = (2 * (1 - cos) / cos) ** 0.5
    noise = torch.randn(n, d, generator=g, dtype=torch.float64) / d**0.5
    return (e + eps * noise) * (torch.rand(n, 1, generator=g, dtype=torch.float64) + 0.5)


def _datainf_problem(dtype, cos, n=200, d=512, m=8, seed=0):
    G = collinear(n, d, cos, seed).to(dtype)
    T = collinear(m, d, cos, seed + 1).to(dtype)
    lam = 0.1 * float(G.double().pow(2).mean())  # the 'auto' damping rule
    exact = ops.datainf_inverse_sum_reference(G.double(), T.double(), lam)
    return G, T, lam, exact


def _score_err(H, exact, G) -> float:
    Gd = G.double()
    return rel_err(H.double() @ Gd.T, exact @ Gd.T)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cos", [0.9, 0.999, 0.99999])
def test_datainf_plan_near_collinear(dtype, cos):
    G, T, lam, exact = _datainf_problem(dtype, cos)
    err = _score_err(datainf_emulated(G, T, lam), exact, G)
    assert err < SCORE_BOUND[dtype], f"{dtype} cos {cos}: score error {err:.2e}"
    if cos == 0.99999:  # the previous plan (C rounded once to 16 bits, 1/n folded in) fails the bound
        prev = _score_err(datainf_emulated(G, T, lam, plan="previous"), exact, G)
        assert prev > 10 * SCORE_BOUND[dtype], f"{dtype}: previous plan {prev:.2e}"


def test_datainf_plan_fp16_small_coefficients():
    """1/n folded into C puts fp16 C in the subnormal range at large n; the kernels apply 1/n in the epilogue."""
    G = collinear(4096, 48, 0.9, 3).to(torch.float16)
    T = (collinear(2, 48, 0.9, 4) * 0.01).to(torch.float16)  # small test vectors: |C_ji / n| ≈ 2e-6
    lam = 0.1 * float(G.double().pow(2).mean())
    exact = ops.datainf_inverse_sum_reference(G.double(), T.double(), lam)
    err = _score_err(datainf_emulated(G, T, lam), exact, G)
    prev = _score_err(datainf_emulated(G, T, lam, plan="previous"), exact, G)
    assert err < 1e-6 and prev > 1e-4, (err, prev)  # emulated: 7e-8 and 1.5e-3


@interp
@pytest.mark.interp
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_datainf_triton_near_collinear(dtype):
    from fastinf.kernels.datainf_inverse_sum import datainf_inverse_sum_triton

    G, T, lam, exact = _datainf_problem(dtype, 0.99999, n=64, d=96, m=3)
    got = datainf_inverse_sum_triton(G, T, lam)
    assert _score_err(got, exact, G) < SCORE_BOUND[dtype]
    if dtype == torch.float16:  # the interpreter runs the plan the emulation describes
        assert rel_err(got, datainf_emulated(G, T, lam)) < 1e-6


@interp
@pytest.mark.interp
def test_datainf_triton_fp16_small_coefficients():
    from fastinf.kernels.datainf_inverse_sum import datainf_inverse_sum_triton

    G = collinear(1024, 32, 0.9, 5).to(torch.float16)
    T = (collinear(2, 32, 0.9, 6) * 0.01).to(torch.float16)
    lam = 0.1 * float(G.double().pow(2).mean())
    exact = ops.datainf_inverse_sum_reference(G.double(), T.double(), lam)
    got = datainf_inverse_sum_triton(G, T, lam)
    prev = _score_err(datainf_emulated(G, T, lam, plan="previous"), exact, G)
    assert _score_err(got, exact, G) < 1e-6 and prev > 1e-4  # previous plan emulated: 3.3e-4


# ------------------------------------------------------------------------------------------------- LoRA
LORA_BOUND = 8e-4  # ‖g − exact‖/‖exact‖ in fp16 (unit roundoff 4.9e-4 on u_op / v_op); previous plan: ~2e-3


def _lora_problem(dtype, dy_scale=1e-6, N=3, S=40, din=64, dout=48, r=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, S, din, generator=g).to(dtype)
    dy = (torch.randn(N, S, dout, generator=g) * dy_scale).to(dtype)
    A = (torch.randn(r, din, generator=g) / din**0.5).to(dtype)
    B = torch.randn(dout, r, generator=g).to(dtype)
    mask = torch.rand(N, S, generator=g) > 0.2
    exact = ops.lora_per_sample_grads_reference(x.double(), dy.double(), A.double(), B.double(), 0.5, mask)
    return x, dy, A, B, mask, exact


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lora_plan_tiny_dy(dtype):
    x, dy, A, B, mask, exact = _lora_problem(dtype)
    u = (x.double() @ A.double().T).to(dtype)  # the hook's u, rounded like the model's lora_A output
    bound = LORA_BOUND if dtype == torch.float16 else 8e-3
    gA, gB = lora_emulated(x, dy, A, B, 0.5, mask, u=u)
    exact_u = ops.lora_per_sample_grads_reference(x.double(), dy.double(), A.double(), B.double(), 0.5, mask, u=u)
    assert rel_err(gA, exact[0]) < bound and rel_err(gB, exact_u[1]) < bound
    if dtype == torch.float16:  # unscaled v = Bᵀdy·w falls into fp16's subnormals
        assert rel_err(lora_emulated(x, dy, A, B, 0.5, mask, u=u, plan="previous")[0], exact[0]) > 2 * bound


@interp
@pytest.mark.interp
@pytest.mark.parametrize("with_u", [False, True])
def test_lora_triton_fp16_tiny_dy(with_u):
    from fastinf.kernels.lora_per_sample_grads import lora_per_sample_grads_triton

    x, dy, A, B, mask, exact = _lora_problem(torch.float16)
    u = (x.double() @ A.double().T).to(torch.float16) if with_u else None
    got = lora_per_sample_grads_triton(x, dy, A, B, 0.5, mask, u=u)
    ex = exact if u is None else ops.lora_per_sample_grads_reference(x.double(), dy.double(), A, B, 0.5, mask, u=u)
    emu = lora_emulated(x, dy, A, B, 0.5, mask, u=u)
    for k in range(2):
        assert rel_err(got[k], ex[k]) < LORA_BOUND
        assert rel_err(got[k], emu[k]) < 1e-5  # the interpreter runs the emulated plan


def test_emulation_rejects_unknown_plan():
    with pytest.raises(ValueError, match="plan"):
        datainf_emulated(torch.ones(2, 3), torch.ones(1, 3), 0.1, plan="fast")
