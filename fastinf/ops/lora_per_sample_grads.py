"""Per-example gradients of a LoRA layer's adapters from its input and output gradient.

For y = base(x) + scale · B (A x) with x (N, S, d_in), dy = ∂L/∂y (N, S, d_out), A (r, d_in),
B (d_out, r) and a mask m (N, S) of the positions that count:

    gB_i = scale Σ_s m_is dy_is (A x_is)ᵀ   (d_out, r)
    gA_i = scale Σ_s m_is (Bᵀ dy_is) x_isᵀ  (r, d_in)

These are exactly the gradients of Σ_i L_i with respect to A and B split by example i, because
example i's loss depends only on its own rows of x and dy.

``u`` (optional, (N, S, r)) is A x as the capture hook recorded it (the output of ``lora_A``); passing it
spares the kernels a read of x. None computes it (backward compatible).
"""

from __future__ import annotations

import torch

from ._dispatch import select

__all__ = ["lora_per_sample_grads", "lora_per_sample_grads_reference"]


def _check(x, dy, A, B, mask, u=None) -> None:
    if x.dim() != 3 or dy.dim() != 3:
        raise ValueError(f"lora_per_sample_grads: x and dy must be (N, S, d), got {tuple(x.shape)}, {tuple(dy.shape)}")
    if x.shape[:2] != dy.shape[:2]:
        raise ValueError(f"lora_per_sample_grads: x {tuple(x.shape)} and dy {tuple(dy.shape)} differ in (N, S)")
    if (
        A.dim() != 2
        or B.dim() != 2
        or A.shape[1] != x.shape[2]
        or B.shape[0] != dy.shape[2]
        or B.shape[1] != A.shape[0]
    ):
        raise ValueError(
            f"lora_per_sample_grads: A {tuple(A.shape)} must be (r, d_in={x.shape[2]}) and B {tuple(B.shape)} "
            f"(d_out={dy.shape[2]}, r)"
        )
    if mask is not None and tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"lora_per_sample_grads: mask must be (N, S) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
    if u is not None and tuple(u.shape) != (*x.shape[:2], A.shape[0]):
        raise ValueError(
            f"lora_per_sample_grads: u = A x must be (N, S, r) = {(*x.shape[:2], A.shape[0])}, got {tuple(u.shape)}"
        )


def lora_per_sample_grads_reference(
    x: torch.Tensor,
    dy: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float = 1.0,
    mask: torch.Tensor | None = None,
    *,
    u: torch.Tensor | None = None,
    return_sq_norms: bool = False,
):
    """PyTorch reference (two small GEMMs and two batched GEMMs; float32 accumulation at least).

    Returns ``(gA (N, r, d_in), gB (N, d_out, r))``, plus the (N,) squared norms ‖gA_i‖² + ‖gB_i‖²
    when ``return_sq_norms=True``.

    Raises:
        ValueError: shapes that do not fit together (x, dy, A, B, mask, u).
    """
    _check(x, dy, A, B, mask, u)
    dt = torch.promote_types(torch.promote_types(x.dtype, dy.dtype), torch.float32)
    xf, dyf = x.to(dt), dy.to(dt)
    if mask is not None:
        dyf = dyf * mask.to(dt).unsqueeze(-1)
    u = xf @ A.to(dt).T if u is None else u.to(dt)  # (N, S, r) = A x
    v = dyf @ B.to(dt)  # (N, S, r) = Bᵀ dy
    gB = torch.bmm(dyf.transpose(1, 2), u).mul_(scale)  # (N, d_out, r)
    gA = torch.bmm(v.transpose(1, 2), xf).mul_(scale)  # (N, r, d_in)
    if return_sq_norms:
        return gA, gB, gA.pow(2).sum((1, 2)) + gB.pow(2).sum((1, 2))
    return gA, gB


def lora_per_sample_grads(
    x: torch.Tensor,
    dy: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float = 1.0,
    mask: torch.Tensor | None = None,
    *,
    u: torch.Tensor | None = None,
    return_sq_norms: bool = False,
    backend: str = "auto",
):
    """Dispatching version of :func:`lora_per_sample_grads_reference` (same contract).

    ``backend``: ``"auto"`` (the order of ``fastinf.ops._dispatch.DISPATCH_TABLE``), ``"cuda"``, ``"triton"``
    or ``"torch"``. The kernels read each of x and dy once (u given; else one more read of x for u), accept
    float16/bfloat16/float32 and accumulate in float32; float64 runs on the PyTorch reference.

    Raises:
        ValueError: shapes that do not fit together.
        RuntimeError: an explicit ``backend`` that cannot run these inputs (the reason is in the message).
    """
    _check(x, dy, A, B, mask, u)
    _, fn = select("lora_per_sample_grads", backend, x.device, (x, dy, A, B, scale, mask), {"u": u})
    return fn(x, dy, A, B, scale, mask, u=u, return_sq_norms=return_sq_norms)
