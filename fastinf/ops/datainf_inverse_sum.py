"""DataInf's preconditioned test vectors for one block (METHODS.md §3).

H = (T − C G / n) / λ with C_ji = (t_j · g_i) / (λ + ‖g_i‖²), i.e. row j of H is
h(t_j) = (1/(nλ)) Σ_i [t_j − (g_iᵀ t_j / (λ + ‖g_i‖²)) g_i].
"""

from __future__ import annotations

import torch

from ._dispatch import select

__all__ = ["datainf_inverse_sum", "datainf_inverse_sum_reference", "small_m", "SMALL_M"]

SMALL_M = 8  # up to this many test vectors the op is two GEMVs (the dispatcher's small-m route)


def _check(G: torch.Tensor, T: torch.Tensor, lam: float) -> None:
    if G.dim() != 2 or T.dim() != 2:
        raise ValueError(f"datainf_inverse_sum: G and T must be 2-D, got {tuple(G.shape)} and {tuple(T.shape)}")
    if G.shape[1] != T.shape[1]:
        raise ValueError(f"datainf_inverse_sum: width mismatch, G is {tuple(G.shape)} and T is {tuple(T.shape)}")
    if G.shape[0] == 0:
        raise ValueError("datainf_inverse_sum: G has no rows (n = 0)")
    if not float(lam) > 0:
        raise ValueError(f"datainf_inverse_sum: lam must be > 0, got {lam}")


def datainf_inverse_sum_reference(
    G: torch.Tensor,
    T: torch.Tensor,
    lam: float,
    *,
    sq_norms: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """PyTorch reference. G (n, d) training gradients, T (m, d) test vectors → H (m, d).

    Streams over ``chunk_size`` rows of G at a time, so no (n × m) matrix larger than
    ``chunk_size × m`` is held. ``sq_norms`` (n,) may pass precomputed ‖g_i‖².
    Accumulates in at least float32.
    """
    _check(G, T, lam)
    n = G.shape[0]
    acc_dtype = torch.promote_types(torch.promote_types(G.dtype, T.dtype), torch.float32)
    Tc = T.to(acc_dtype)
    S = torch.zeros_like(Tc)
    step = n if chunk_size is None else max(1, int(chunk_size))
    for s in range(0, n, step):
        g = G[s : s + step].to(acc_dtype)
        nsq = torch.linalg.vector_norm(g, dim=1).square() if sq_norms is None else sq_norms[s : s + step].to(acc_dtype)
        C = (Tc @ g.T) / (lam + nsq)  # (m, c)
        S.addmm_(C, g)
    return (Tc - S / n) / lam


def small_m(G: torch.Tensor, T: torch.Tensor, lam: float, **_) -> bool:
    """The dispatcher's small-m shape class: at most :data:`SMALL_M` test vectors (bandwidth-bound GEMVs)."""
    return T.shape[0] <= SMALL_M


def datainf_inverse_sum(
    G: torch.Tensor, T: torch.Tensor, lam: float, *, backend: str = "auto", **kwargs
) -> torch.Tensor:
    """Dispatching version of :func:`datainf_inverse_sum_reference` (same contract and keyword options).

    ``backend``: ``"auto"`` (the route of ``fastinf.ops._dispatch.DISPATCH_TABLE`` for this shape class: the
    small-m class m ≤ 8 and the rest), ``"cuda"``, ``"triton"`` or ``"torch"``. The kernels accept
    float16/bfloat16/float32 inputs and accumulate in float32; float64 runs on the PyTorch reference.

    Raises:
        ValueError: bad shapes or λ ≤ 0.
        RuntimeError: an explicit ``backend`` that cannot run these inputs (the reason is in the message).
    """
    _check(G, T, lam)
    _, fn = select("datainf_inverse_sum", backend, G.device, (G, T, lam), kwargs)
    return fn(G, T, lam, **kwargs)
