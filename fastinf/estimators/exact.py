"""Exact damped influence (METHODS.md §1): I(i, j) = − g_iᵀ (G + λI)⁻¹ t_j, G = (1/n) ΦΦᵀ.

At fit time the training side is preconditioned once, M = (G + λI)⁻¹ g_i for every i, by one of
two algebraically identical solves per block group (global: one group of all blocks):

* d-space: Cholesky of the (D_g × D_g) matrix G + λI; cost O(n D_g² + D_g³). Used when D_g ≤ n.
* n-space (push-through): (G + λI)⁻¹ Φ = n Φ (K + nλI)⁻¹ with the (n × n) Gram K = ΦᵀΦ;
  cost O(n² D_g + n³). Used when n < D_g.

Scoring is then one GEMM per block against the test gradients. The solve runs in float64 by default.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .base import Estimator, EstimatorOptions, register

log = logging.getLogger("fastinf")

__all__ = ["Exact", "spd_solve"]


def spd_solve(A: torch.Tensor, B: torch.Tensor, floor: float) -> torch.Tensor:
    """Solve A X = B for symmetric positive-definite A (Cholesky).

    If the factorisation fails numerically, falls back to an eigendecomposition with eigenvalues
    clamped at ``floor`` (a known lower bound of A's spectrum, e.g. nλ), and logs a warning.
    """
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(B, L)
    log.warning(
        "Cholesky failed (matrix %d×%d, dtype %s); using a clamped eigendecomposition. Consider dtype=torch.float64 "
        "or a larger damping.",
        A.shape[0],
        A.shape[1],
        A.dtype,
    )
    w, V = torch.linalg.eigh(A)
    w = w.clamp_min(floor)
    return V @ ((V.T @ B) / w[:, None])


@dataclass
class ExactOptions(EstimatorOptions):
    solve: str = field(default="auto", metadata={"help": "'auto' (min(n, D)), 'n' (Gram / push-through) or 'd'"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solve not in ("auto", "n", "d"):
            raise ValueError(f"solve must be 'auto', 'n' or 'd', got {self.solve!r}")


@register
class Exact(Estimator):
    """Exact damped influence, global (default) or block-wise (``blockwise=True``).

    Options: ``solve="auto"|"n"|"d"``; ``dtype`` defaults to float64 (the preconditioned training
    gradients are kept in that dtype: memory ≈ n·D·8 bytes).
    """

    name = "exact"
    Options = ExactOptions
    default_dtype = torch.float64

    def _fit(self) -> None:
        train = self.train_
        n = train.n
        self.M_: dict[str, torch.Tensor] = {}
        self.solves_: dict[tuple[str, ...], str] = {}
        for group in self.block_groups():
            lam = self.damping_for(group)
            width = sum(train.dims[k] for k in group)
            solve = self.options.solve
            if solve == "auto":
                solve = "d" if width <= n else "n"
            self.solves_[tuple(group)] = solve
            if solve == "n":
                K = None
                for k in group:
                    x = train[k]
                    K = x @ x.T if K is None else K.addmm_(x, x.T)
                K.diagonal().add_(n * lam)
                for k in group:
                    self.M_[k] = spd_solve(K, train[k], n * lam).mul_(n)
            else:
                X = torch.cat([train[k] for k in group], dim=1) if len(group) > 1 else train[group[0]]
                H = (X.T @ X).div_(n)
                H.diagonal().add_(lam)
                MT = spd_solve(H, X.T, lam)  # (D_g, n)
                off = 0
                for k in group:
                    d = train.dims[k]
                    self.M_[k] = MT[off : off + d].T.contiguous()
                    off += d

    def _train_side(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.M_[name][start:stop]

    def self_influence(self) -> torch.Tensor:
        train = self._check_fitted()
        return -sum((train[k] * self.M_[k]).sum(1) for k in train.names)
