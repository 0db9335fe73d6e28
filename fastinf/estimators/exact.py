"""Exact damped influence (METHODS.md §1): I(i, j) = − g_iᵀ (G + λI)⁻¹ t_j, G = (1/n) ΦΦᵀ.

At fit time each block group (global: one group of all blocks) is factorised once, by one of two
algebraically identical solves:

* d-space: Cholesky of the (D_g × D_g) matrix G + λI; cost O(n D_g² + D_g³). Used when D_g ≤ n.
* n-space (push-through / Woodbury): Cholesky of the (n × n) matrix K + nλI, K = ΦᵀΦ;
  cost O(n² D_g + n³). Used when n < D_g. Then (G + λI)⁻¹ t = (t − Φ (K + nλI)⁻¹ Φᵀ t) / λ.

Scoring preconditions the m test vectors (cost O(m n D_g) or O(m D_g²)) and takes one GEMM per
block against the training gradients, in chunks of training examples for ``topk``. Memory: one
n×n (or D_g×D_g) factor per group. The solve runs in float64 by default.
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

    Options: ``solve="auto"|"n"|"d"``; ``dtype`` defaults to float64 (the training gradients are held
    in that dtype, plus one factor per block group).
    """

    name = "exact"
    Options = ExactOptions
    default_dtype = torch.float64
    cast_storage = False

    def _fit(self) -> None:
        train = self.train_
        n = train.n
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
                A = self._gram_rows(group, 0, n)
                A.diagonal().add_(n * lam)
                self.factors_[tuple(group)] = (SPDFactor(A, n * lam), lam)
            else:
                X = self._cat_blocks(group)
                H = (X.T @ X).div_(n)
                H.diagonal().add_(lam)
                self.factors_[tuple(group)] = (SPDFactor(H, lam), lam)

    @staticmethod
    def _cat(gs, group: list[str]) -> torch.Tensor:
        return torch.cat([gs[k] for k in group], dim=1) if len(group) > 1 else gs[group[0]]

    def _cat_blocks(self, group: list[str], start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows start..stop of the group's training blocks, concatenated, in the compute dtype."""
        parts = [self.train_[k][start:stop].to(self.compute_dtype_) for k in group]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _gram_rows(self, group: list[str], start: int, stop: int) -> torch.Tensor:
        """Rows start..stop of the Gram matrix K = Σ_l X_l X_lᵀ of a group: (c, n)."""
        K = None
        for k in group:
            x = self._blk(k)
            K = x[start:stop] @ x.T if K is None else K.addmm_(x[start:stop], x.T)
        return K

    def _test_side(self, test) -> dict[str, torch.Tensor]:
        """(G + λI)⁻¹ t per block. n-space groups use Woodbury,
        (G + λI)⁻¹ t = (t − Φ (K + nλI)⁻¹ Φᵀ t) / λ; d-space groups the cached Cholesky factor."""
        train, out = self.train_, {}
        for group in self.block_groups():
            fac, lam = self.factors_[tuple(group)]
            if self.solves_[tuple(group)] == "n":
                blocks = {k: self._blk(k) for k in group} if len(group) == 1 else None
                P = sum((blocks[k] if blocks else self._blk(k)) @ test[k].T for k in group)  # (n, m)
                C = fac.solve(P)  # (K + nλI)⁻¹ Φᵀ t
                for k in group:
                    out[k] = (test[k] - C.T @ (blocks[k] if blocks else self._blk(k))).div_(lam)
            else:
                H = fac.solve(self._cat(test, group).T).T
                off = 0
                for k in group:
                    d = train.dims[k]
                    out[k] = H[:, off : off + d]
                    off += d
        return out

    def inverse_hvp(self, test) -> dict[str, torch.Tensor]:
        """(G + λI)⁻¹ t for every test vector, per block: name -> (m, d_l).

        ``score(test)`` equals −Σ_l inverse_hvp(test)_l Φ_lᵀ.
        """
        return self._test_side(self._prep_test(test))

    def self_influence(self) -> torch.Tensor:
        """−g_iᵀ(G + λI)⁻¹g_i; n-space groups: −(K_ii − (K (K + nλI)⁻¹ K)_ii)/λ in row chunks of K."""
        train, n = self._check_fitted(), self.n_
        out = torch.zeros(n, dtype=self.compute_dtype_, device=train.device)
        chunk = self._chunk(n)
        for group in self.block_groups():
            fac, lam = self.factors_[tuple(group)]
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                if self.solves_[tuple(group)] == "n":
                    Kc = self._gram_rows(group, s, e)  # (c, n)
                    quad = Kc[:, s:e].diagonal() - (Kc * fac.solve(Kc.T).T).sum(1)
                    out[s:e] -= quad / lam
                else:
                    X = self._cat_blocks(group, s, e)
                    out[s:e] -= (X * fac.solve(X.T).T).sum(1)
        return out
