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


class SPDFactor:
    """A factorisation of a symmetric positive-definite matrix A, for repeated solves A X = B.

    Cholesky; if that fails numerically, an eigendecomposition with eigenvalues clamped at ``floor``
    (a known lower bound of A's spectrum, e.g. nλ), with a logged warning.
    """

    def __init__(self, A: torch.Tensor, floor: float) -> None:
        L, info = torch.linalg.cholesky_ex(A)
        self.L = L if int(info) == 0 else None
        if self.L is None:
            log.warning(
                "Cholesky failed (matrix %d×%d, dtype %s); using a clamped eigendecomposition. Consider "
                "dtype=torch.float64 or a larger damping.",
                A.shape[0],
                A.shape[1],
                A.dtype,
            )
            w, self.V = torch.linalg.eigh(A)
            self.w = w.clamp_min(floor)

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        if self.L is not None:
            return torch.cholesky_solve(B, self.L)
        return self.V @ ((self.V.T @ B) / self.w[:, None])


def spd_solve(A: torch.Tensor, B: torch.Tensor, floor: float) -> torch.Tensor:
    """Solve A X = B for symmetric positive-definite A (see :class:`SPDFactor`)."""
    return SPDFactor(A, floor).solve(B)


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
        self.factors_: dict[tuple[str, ...], tuple[SPDFactor, float]] = {}
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
                fac = SPDFactor(K, n * lam)
                for k in group:
                    self.M_[k] = fac.solve(train[k]).mul_(n)
            else:
                X = torch.cat([train[k] for k in group], dim=1) if len(group) > 1 else train[group[0]]
                H = (X.T @ X).div_(n)
                H.diagonal().add_(lam)
                fac = SPDFactor(H, lam)
                MT = fac.solve(X.T)  # (D_g, n)
                off = 0
                for k in group:
                    d = train.dims[k]
                    self.M_[k] = MT[off : off + d].T.contiguous()
                    off += d
            self.factors_[tuple(group)] = (fac, lam)

    def inverse_hvp(self, test) -> dict[str, torch.Tensor]:
        """(G + λI)⁻¹ t for every test vector, per block: name -> (m, d_l) (the test-side form).

        n-space groups use Woodbury, (G + λI)⁻¹ t = (t − Φ (K + nλI)⁻¹ Φᵀ t) / λ; d-space groups the
        cached Cholesky factor. ``score(test)`` equals −Σ_l inverse_hvp(test)_l Φ_lᵀ.
        """
        test = self._prep_test(test)
        train, out = self.train_, {}
        for group in self.block_groups():
            fac, lam = self.factors_[tuple(group)]
            if self.solves_[tuple(group)] == "n":
                P = sum(train[k] @ test[k].T for k in group)  # (n, m)
                C = fac.solve(P)  # (K + nλI)⁻¹ Φᵀ t
                for k in group:
                    out[k] = (test[k] - C.T @ train[k]) / lam
            else:
                T = torch.cat([test[k] for k in group], 1) if len(group) > 1 else test[group[0]]
                H = fac.solve(T.T).T
                off = 0
                for k in group:
                    d = train.dims[k]
                    out[k] = H[:, off : off + d]
                    off += d
        return out

    def _train_side(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.M_[name][start:stop]

    def self_influence(self) -> torch.Tensor:
        train = self._check_fitted()
        return -sum((train[k] * self.M_[k]).sum(1) for k in train.names)
