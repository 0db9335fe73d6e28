"""Exact damped influence (METHODS.md §1): I(i, j) = − g_iᵀ (G + λI)⁻¹ t_j, G = (1/n) ΦΦᵀ.

At fit time each block group (global: one group of all blocks) is factorised once, by one of two
algebraically identical solves:

* d-space: Cholesky of the (D_g × D_g) matrix G + λI; cost O(n D_g² + D_g³). Used when D_g ≤ n.
* n-space (push-through / Woodbury): Cholesky of the (n × n) matrix K + nλI, K = ΦᵀΦ;
  cost O(n² D_g + n³). Used when n < D_g. Then (G + λI)⁻¹ t = (t − Φ (K + nλI)⁻¹ Φᵀ t) / λ.

Scoring preconditions the m test vectors (cost O(m n D_g) or O(m D_g²)) and takes one GEMM per
block against the training gradients, row chunk by row chunk. Memory: one n×n (or D_g×D_g) factor per
group. The solve runs in float64 by default.

Large training sets (a GradientStore, or rows split over ranks): d-space accumulates G = Σ_i g_i g_iᵀ / n
chunk by chunk in one pass (all-reduced across ranks). n-space needs the n×n Gram K, each entry from a
pair of row chunks; on a store it is refused when n² × 8 bytes exceeds ``memory_budget`` and under
distribution always (K pairs rows of different ranks), with an error suggesting ``solve="d"`` or a
projection; ``solve="auto"`` then picks d-space.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..distributed import all_reduce_sum
from ..gradients.gradient_set import GradientSet
from .base import Estimator, EstimatorOptions, register
from .damping import LABEL_FREE_RULE

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

    Options: ``solve="auto"|"n"|"d"``; ``dtype`` defaults to float64 (in-memory training gradients are
    held in their own dtype, ≥ float32, and converted one row chunk at a time; plus one factor per block
    group).

    Damping: ``damping="auto"`` is the label-free rule :data:`~.damping.LABEL_FREE_RULE`, λ = 10 · tr(G) /
    min(n, D_g) (``"mean_eig"``, c = 10: chosen on Rotten Tomatoes and validated on held-out tasks by
    ``bench/bench_damping.py``; ≈ 10⁴ × the papers' λ at LoRA sizes, where exact at the papers' λ ranks near
    chance). ``damping="paper"``, or an explicit ``damping_factor``, gives the papers' rule (what the compat
    engines use); a float, a dict block → λ (``blockwise=True``) or any rule of
    :func:`~fastinf.select_damping` as usual.

    Passes over the training gradients and memory (D_g: a group's width, D_g = D when global):

    * d-space: ``fit`` 1 (G and the 'auto' λ together); ``score`` / ``topk`` / ``self_influence`` 1 each.
      Memory O(chunk·D + m·D + output) plus D_g² per group (float64: 8·D_g² bytes).
    * n-space: ``fit`` 1 + ⌈n/chunk⌉ (K from pairs of row chunks); ``score`` / ``topk`` 3 (Φᵀt, the
      Woodbury correction, the scores); ``self_influence`` 1 + ⌈n/chunk⌉. Memory O(chunk·D + m·D + n·m
      + output) plus n² per group (the factor). One process only; on a store only while 8·n² ≤
      ``memory_budget``.

    ``solve="auto"`` takes the smaller of n and D_g, except that n-space is only eligible where it is
    allowed (in memory on one process, or a store with 8·n² ≤ ``memory_budget``).
    """

    name = "exact"
    Options = ExactOptions
    default_dtype = torch.float64
    # damping="auto": the label-free rule bench/bench_damping.py chose on Rotten Tomatoes and validated on the
    # held-out tasks (README "Damping"); damping="paper" (or an explicit damping_factor) is the papers' rule
    default_damping = LABEL_FREE_RULE
    cast_storage = False

    def _n_space_problem(self) -> str | None:
        """Why n-space cannot run here (None when it can)."""
        n = self.n_
        if self.distributed_:
            return "the n×n Gram pairs training rows of different ranks, and the rows are split over ranks"
        if self._train_store is not None and 8 * n * n > self.options.memory_budget:
            return (
                f"the n×n Gram of n = {n} rows needs {8 * n * n / 2**30:.3g} GiB, more than memory_budget = "
                f"{self.options.memory_budget / 2**30:.3g} GiB"
            )
        return None

    def _fit(self) -> None:
        train = self._check_fitted()
        n = self.n_
        self.solves_: dict[tuple[str, ...], str] = {}
        self.factors_: dict[tuple[str, ...], tuple[SPDFactor, float]] = {}
        problem = self._n_space_problem()
        for group in self.block_groups():
            width = sum(train.dims[k] for k in group)
            solve = self.options.solve
            if solve == "auto":
                solve = "d" if width <= n or problem is not None else "n"
            elif solve == "n" and problem is not None:
                raise ValueError(
                    f"Exact: solve='n' is not possible here: {problem}. Use solve='d' (memory "
                    f"{8 * width * width / 2**30:.3g} GiB for D_g = {width}) or project the gradients to a "
                    "smaller D (e.g. a per-block random projection at capture)"
                )
            self.solves_[tuple(group)] = solve
        dgroups = [g for g in self.block_groups() if self.solves_[tuple(g)] == "d"]
        if dgroups:  # one pass: G of every d-space group (and the per-block sums of squares for λ)
            H = {
                tuple(g): torch.zeros(w, w, dtype=self.compute_dtype_, device=self.device_)
                for g in dgroups
                for w in [sum(train.dims[k] for k in g)]
            }
            for _, _, ch in self._pass():
                for g in dgroups:
                    X = self._cat(ch, g)
                    H[tuple(g)].addmm_(X.T, X)
            for g in dgroups:
                Hg = all_reduce_sum(H.pop(tuple(g))) if self.distributed_ else H.pop(tuple(g))
                Hg.div_(n)
                lam = self.damping_for(g, eigvals=lambda Hg=Hg: torch.linalg.eigvalsh(Hg.double()))
                Hg.diagonal().add_(lam)
                self.factors_[tuple(g)] = (SPDFactor(Hg, lam), lam)
        for g in self.block_groups():
            if self.solves_[tuple(g)] == "n":
                A = self._gram_rows(g, 0, n)
                lam = self.damping_for(g, eigvals=lambda A=A: torch.linalg.eigvalsh(A.double()) / n)
                A.diagonal().add_(n * lam)
                self.factors_[tuple(g)] = (SPDFactor(A, n * lam), lam)

    @staticmethod
    def _cat(gs, group: list[str]) -> torch.Tensor:
        return torch.cat([gs[k] for k in group], dim=1) if len(group) > 1 else gs[group[0]]

    def _gram_rows(self, group: list[str], start: int, stop: int, rows: GradientSet | None = None) -> torch.Tensor:
        """Rows start..stop of the Gram matrix K = Σ_l X_l X_lᵀ of a group: (c, n), from pairs of row chunks
        (one pass over the other rows per outer chunk; ``rows``: rows start..stop already read)."""
        n = self.n_
        K = torch.empty(stop - start, n, dtype=self.compute_dtype_, device=self.device_)
        chunk = self._chunk(stop - start)
        outer = [(start, stop, rows)] if rows is not None else self._pass(chunk, start, stop)
        for s, e, ch in outer:
            X = self._cat(ch, group)
            for s2, e2, other in self._pass(chunk, 0, n):
                K[s - start : e - start, s2:e2] = X @ self._cat(other, group).T
        return K

    def _test_side(self, test) -> dict[str, torch.Tensor]:
        """(G + λI)⁻¹ t per block. n-space groups use Woodbury,
        (G + λI)⁻¹ t = (t − Φ (K + nλI)⁻¹ Φᵀ t) / λ (two passes); d-space groups the cached factor."""
        train, out = self.train_, {}
        ngroups = [g for g in self.block_groups() if self.solves_[tuple(g)] == "n"]
        if ngroups:
            n = self.n_
            chunk = self._chunk(test.n)
            P = {tuple(g): torch.empty(n, test.n, dtype=self.compute_dtype_, device=self.device_) for g in ngroups}
            for s, e, ch in self._pass(chunk):  # Φᵀ t
                for g in ngroups:
                    P[tuple(g)][s:e] = self._cat(ch, g) @ self._cat(test, g).T
            C = {tuple(g): self.factors_[tuple(g)][0].solve(P.pop(tuple(g))) for g in ngroups}  # (K + nλI)⁻¹ Φᵀ t
            corr = {k: torch.zeros_like(test[k]) for g in ngroups for k in g}
            for s, e, ch in self._pass(chunk):  # Φ C
                for g in ngroups:
                    Cc = C[tuple(g)][s:e].T  # (m, c)
                    for k in g:
                        corr[k].addmm_(Cc, ch[k])
            for g in ngroups:
                lam = self.factors_[tuple(g)][1]
                for k in g:
                    out[k] = (test[k] - corr[k]).div_(lam)
        for group in self.block_groups():
            if self.solves_[tuple(group)] == "n":
                continue
            fac, _ = self.factors_[tuple(group)]
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

    def self_influence(self, *, gather: bool = False) -> torch.Tensor:
        """−g_iᵀ(G + λI)⁻¹g_i; n-space groups: −(K_ii − (K (K + nλI)⁻¹ K)_ii)/λ in row chunks of K.
        Distributed: this rank's rows (all n with ``gather=True``)."""
        self._check_fitted()
        a, b = self.rows_
        out = torch.zeros(b - a, dtype=self.compute_dtype_, device=self.device_)
        for s, e, ch in self._pass(self._self_chunk_size()):
            for group in self.block_groups():
                fac, lam = self.factors_[tuple(group)]
                if self.solves_[tuple(group)] == "n":
                    Kc = self._gram_rows(group, s, e, rows=ch)  # (c, n)
                    quad = Kc[:, s:e].diagonal() - (Kc * fac.solve(Kc.T).T).sum(1)
                    out[s - a : e - a] -= quad / lam
                else:
                    X = self._cat(ch, group)
                    out[s - a : e - a] -= (X * fac.solve(X.T).T).sum(1)
        return self._gather_cols(out, gather)
