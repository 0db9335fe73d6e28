"""float64 emulations of the kernels' rounding plans (imports neither triton nor the CUDA extension).

The Triton interpreter upcasts bfloat16 to float32 (``_common.interp_upcast``), so on a CPU it cannot show
what 16-bit operands do to the result. These functions evaluate each kernel's arithmetic in float64 with
exactly the roundings its plan makes: inputs and the staged 16-bit operands rounded to the input dtype with
``Tensor.to`` (round-to-nearest-even, like the kernels' conversions), each float32 intermediate rounded once
to float32 (the order of a float32 accumulation is not modelled: ~1e-7 relative per sum). A test can then
hold the plan against the float64 formula on the same inputs (tests/ops/test_numerics.py), and the
interpreter's float16 runs (real float16 roundings) against the emulation. ``plan="previous"`` evaluates the
plan the kernels had before issue 10 (one rounding of C with 1/n folded in; u·w and v·w rounded without
scaling): the negative control that shows the tests can fail.
"""

from __future__ import annotations

import torch

from ._common import compute_dtype, datainf_row_scales, pow2_normalise

__all__ = ["datainf_emulated", "lora_emulated"]

PLANS = ("kernel", "previous")


def _plan(plan: str) -> str:
    if plan not in PLANS:
        raise ValueError(f"plan must be one of {PLANS}, got {plan!r}")
    return plan


def _rounded(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    return t.to(dt).double()


def datainf_emulated(G: torch.Tensor, T: torch.Tensor, lam: float, *, plan: str = "kernel") -> torch.Tensor:
    """H (m, d) float64 as the DataInf kernels compute it from G (n, d) and T (m, d) in their dtype.

    ``kernel``: P = T Gᵀ, ‖g‖² and cinv = 1/(λ + ‖g‖²) in float32; C = P·cinv·rscale_j (a power of two per
    test row, :func:`~fastinf.kernels._common.datainf_row_scales`); 16-bit G: C = hi + lo, each rounded to G's
    dtype; H = T/λ − (C G)/(rscale_j n λ). ``previous``: C·(1/n) rounded once to G's dtype, H = (T − C G)/λ.
    """
    plan = _plan(plan)
    dt = compute_dtype(G, T)
    Gd, Td = _rounded(G, dt), _rounded(T, dt)
    n = G.shape[0]
    f32 = _f32
    P = f32(Td @ Gd.T)
    nsq = f32(Gd.pow(2).sum(1))
    if plan == "previous":
        C = f32(P * f32(1.0 / ((nsq + lam) * n)))
        C = C if dt == torch.float32 else _rounded(C, dt)
        return f32(f32(Td - f32(C @ Gd)) / lam)
    cinv = f32(1.0 / (nsq + lam))
    rs = datainf_row_scales(P, cinv)
    C = f32(f32(P * cinv) * rs[:, None])
    if dt == torch.float32:
        Cq = C
    else:
        hi = _rounded(C, dt)
        Cq = hi + _rounded(C - hi, dt)
    out_scale = f32(1.0 / (rs * n * lam))
    return f32(f32(Td * f32(torch.tensor(1.0 / lam))) - f32(f32(Cq @ Gd) * out_scale[:, None]))


def _f32(t: torch.Tensor) -> torch.Tensor:
    """A float32 rounding (the kernels' float32 intermediates and accumulators, each result rounded once)."""
    return t.float().double()


def lora_emulated(
    x: torch.Tensor,
    dy: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float = 1.0,
    mask: torch.Tensor | None = None,
    *,
    u: torch.Tensor | None = None,
    plan: str = "kernel",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gA, gB) float64 as the LoRA kernels compute them in the inputs' dtype.

    ``kernel``: x, dy, B in the input dtype; u = x Aᵀ rounded to it when not given; u·w and v·w (v = dy B,
    w = scale·mask) each scaled per example by a power of two (:func:`~fastinf.kernels._common.pow2_normalise`)
    and rounded to the input dtype; gB = dyᵀ u_op · 2^eu, gA = v_opᵀ x · 2^ev. ``previous``: u·w and v·w
    rounded to the input dtype as they are.
    """
    plan = _plan(plan)
    dt = compute_dtype(x, dy)
    xd, dyd, Bd = _rounded(x, dt), _rounded(dy, dt), _rounded(B, dt)
    ud = _rounded(xd @ _rounded(A, dt).T, dt) if u is None else u.double()
    w = torch.full(x.shape[:2], float(scale), dtype=torch.float64) if mask is None else mask.double() * scale
    uw, vw = ud * w[..., None], (dyd @ Bd) * w[..., None]
    if plan == "previous":
        u_op, v_op = _rounded(uw, dt), _rounded(vw, dt)
    else:
        u_s, eu = pow2_normalise(uw, dt)
        v_s, ev = pow2_normalise(vw, dt)
        u_op = u_s.double() * eu.double()[:, None, None]
        v_op = v_s.double() * ev.double()[:, None, None]
    gB = torch.bmm(dyd.transpose(1, 2), u_op)
    gA = torch.bmm(v_op.transpose(1, 2), xd)
    return gA, gB
