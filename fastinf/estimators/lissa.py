"""LiSSA (METHODS.md §4): stochastic-free Neumann recursion for (G + λI)⁻¹ t.

    r_0 = t,  r_{k+1} = t + (I − (G + λI)/s) r_k,  (G + λI)⁻¹ t ≈ r_K / s,

run for all m test vectors at once per block group (default: per block, like the DataInf code).
The scale s must exceed half the largest eigenvalue of G + λI; when not given it is estimated by
power iteration (``power_iters`` steps, ×1.1 safety). Convergence needs about (s/λ)·log(1/ε)
steps.

Stopping rule and ``converged_`` bound the *error*, not the step. Each step yields, for free, the
residual of the current iterate h_k = r_k/s: ρ_k = t − (G + λI) h_k = r_{k+1} − r_k. Since G + λI ⪰ λI,
‖h_k − h*‖ ≤ ‖ρ_k‖/λ, hence ‖h_k − h*‖/‖h*‖ ≤ ε_k = (‖ρ_k‖/λ) / (‖h_k‖ − ‖ρ_k‖/λ). The recursion stops
once ε_k ≤ ``tol`` for every test vector of the block group (the returned r_{k+1}/s is at least as
close to h* when s ≥ λ_max(G + λI)/2, the recursion's convergence condition), and ``converged_`` is
True only if every group stopped that way. (The step criterion ‖r_{k+1} − r_k‖ ≤ tol‖r‖ is weaker by
up to the condition number s/λ: it could claim tol = 1e-6 at a relative error of 4e-5.)

``reference_compat=True`` reproduces the DataInf repository's variant instead: damping sign flipped,
r ← t + r − α[(G − λI) r] with α = 1/scale (scale defaults to 1), ``depth`` defaults to 10, and r
itself is returned. Its fixed point is (G − λI)⁻¹ t (not a damped inverse), so no error bound exists:
with ``tol > 0`` it stops on the relative step ‖r_{k+1} − r_k‖ ≤ tol·‖r_{k+1}‖ instead.
"""

from __future__ import annotations

import logging
import warnings
import zlib
from dataclasses import dataclass, field

import torch

from ..distributed import all_reduce_sum
from ..gradients.gradient_set import GradientSet
from .base import Estimator, EstimatorOptions, register

log = logging.getLogger("fastinf")

__all__ = ["LiSSA"]


@dataclass
class LiSSAOptions(EstimatorOptions):
    blockwise: bool = field(default=True, metadata={"help": "recursion per block (True) or on the global G"})
    depth: int | None = field(default=None, metadata={"help": "recursion steps (default 200; 10 if reference_compat)"})
    scale: float | None = field(default=None, metadata={"help": "s > λ_max(G+λI)/2; None: power iteration"})
    tol: float | None = field(
        default=None,
        metadata={
            "help": "stop when the bound on the relative error ‖h − h*‖/‖h*‖ of every test vector is ≤ tol "
            "(default 1e-6; 0 = run all depth steps; reference_compat: relative step ≤ tol)"
        },
    )
    power_iters: int = field(default=30, metadata={"help": "power-iteration steps for the scale estimate"})
    seed: int = field(default=0, metadata={"help": "seed of the power-iteration start vector"})
    reference_compat: bool = field(default=False, metadata={"help": "the DataInf code's flipped-sign variant"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.depth is None:
            self.depth = 10 if self.reference_compat else 200
        if not isinstance(self.depth, int) or self.depth < 1:
            raise ValueError(f"depth must be a positive int, got {self.depth!r}")
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale!r}")
        if self.tol is None:
            self.tol = 0.0 if self.reference_compat else 1e-6
        if self.tol < 0:
            raise ValueError(f"tol must be >= 0, got {self.tol}")
        if self.power_iters < 1:
            raise ValueError(f"power_iters must be >= 1, got {self.power_iters}")


@register
class LiSSA(Estimator):
    """LiSSA influence (see module docstring).

    Every product G v = (1/n) Φ(Φᵀv) is one pass over the training gradients in row chunks (all block
    groups at once, all-reduced across ranks). Passes: ``fit`` ``power_iters`` (when ``scale`` is not
    given; plus 1 for ``damping="auto"`` only if no earlier pass summed the squares) — 0 with an explicit
    scale and damping; ``score`` / ``topk``: the recursion's steps (at most ``depth``, until every group
    converged) + 1; ``self_influence``: that many per chunk of training rows (LiSSA is not meant for
    large n). Memory: O(chunk·D + m·D + m·chunk + output).
    """

    name = "lissa"
    test_side_collective = True
    Options = LiSSAOptions

    def _fit(self) -> None:
        self.groups_ = self.block_groups()
        self.scale_: dict[tuple[str, ...], float] = {}
        eig = None
        if self.options.scale is None and not self.options.reference_compat:
            eig = self._top_eigs()
        self.lam_ = {tuple(g): self.damping_for(g) for g in self.groups_}
        for g in self.groups_:
            if self.options.scale is not None:
                s = self.options.scale
            elif self.options.reference_compat:
                s = 1.0
            else:
                s = 1.1 * (eig[tuple(g)] + self.lam_[tuple(g)])
            self.scale_[tuple(g)] = float(s)
        self.converged_ = True

    def _gv(self, v: dict[str, torch.Tensor], groups: list[list[str]], m: int) -> dict[str, torch.Tensor]:
        """G v = (1/n) Φ (Φᵀ v) for the rows of v, every group in ``groups``: name -> (m, d_l). One pass."""
        out = {k: torch.zeros_like(v[k]) for g in groups for k in g}
        for _, _, ch in self._pass(self._chunk(m)):
            for g in groups:
                P = sum(v[k] @ ch[k].T for k in g)  # (m, c)
                for k in g:
                    out[k].addmm_(P, ch[k])
        for k in out:
            if self.distributed_:
                out[k] = all_reduce_sum(out[k])
            out[k].div_(self.n_)
        return out

    def _top_eigs(self) -> dict[tuple[str, ...], float]:
        """Largest eigenvalue of G of every group, by power iteration (Rayleigh quotient), all groups in
        the same passes.

        The start vector of each block is seeded by (seed, block name), so the estimate does not
        depend on the order of the blocks."""
        train = self.train_
        v = {}
        for g in self.groups_:
            for k in g:
                gen = torch.Generator().manual_seed(self.options.seed * 1_000_003 + zlib.crc32(k.encode()))
                v[k] = torch.randn(1, train.dims[k], generator=gen, dtype=torch.float64).to(
                    device=self.device_, dtype=self.compute_dtype_
                )
        est = {tuple(g): 0.0 for g in self.groups_}
        active = list(self.groups_)
        for _ in range(self.options.power_iters):
            keep = []
            for g in active:
                nrm = torch.sqrt(sum(v[k].pow(2).sum() for k in g))
                if not nrm > 0:
                    est[tuple(g)] = 0.0
                    continue
                for k in g:
                    v[k] = v[k] / nrm
                keep.append(g)
            active = keep
            if not active:
                break
            w = self._gv(v, active, 1)
            for g in active:
                est[tuple(g)] = float(sum((w[k] * v[k]).sum() for k in g))  # Rayleigh quotient
                for k in g:
                    v[k] = w[k]
        return est

    def _test_side(self, test: GradientSet) -> dict[str, torch.Tensor]:
        o = self.options
        out: dict[str, torch.Tensor] = {}
        unconverged: list[tuple[str, float]] = []
        r = {k: test[k].clone() for k in test.names}
        converged = {tuple(g): o.tol == 0 for g in self.groups_}
        active = list(self.groups_)
        for _ in range(o.depth):
            if not active:
                break
            Gr = self._gv(r, active, test.n)
            still = []
            for g in active:
                lam, s = self.lam_[tuple(g)], self.scale_[tuple(g)]
                if o.reference_compat:
                    # DataInf code: r ← t + r − α[(1/n)Σ(gᵀr)g − λr], α = 1/s
                    new = {k: test[k] + r[k] - (Gr[k] - lam * r[k]) / s for k in g}
                else:
                    new = {k: test[k] + r[k] - (Gr[k] + lam * r[k]) / s for k in g}
                done = False
                if o.tol > 0:
                    if o.reference_compat:
                        num = sum(float((new[k] - r[k]).pow(2).sum()) for k in g)
                        den = sum(float(new[k].pow(2).sum()) for k in g)
                        done = num <= (o.tol**2) * den
                    else:
                        # error-bound test per test vector: (s/λ)(1 + tol)‖Δr_j‖ ≤ tol‖r_j‖ (module docstring)
                        factor = (s / lam) * (1.0 + o.tol)
                        num = sum((new[k] - r[k]).pow(2).sum(1) for k in g)  # ‖ρ_j‖², per test vector j
                        den = sum(r[k].pow(2).sum(1) for k in g)  # ‖r_j‖² = s²‖h_j‖²
                        done = bool((num * factor**2 <= den * o.tol**2).all())
                for k in g:
                    r[k] = new[k]
                if done:
                    converged[tuple(g)] = True
                else:
                    still.append(g)
            active = still
        for g in self.groups_:
            lam, s = self.lam_[tuple(g)], self.scale_[tuple(g)]
            if not converged[tuple(g)]:
                self.converged_ = False
                unconverged.append((g[0] if len(g) == 1 else f"{len(g)} blocks", s / lam))
            for k in g:
                out[k] = r[k] if o.reference_compat else r[k] / s
        if unconverged:
            worst = max(unconverged, key=lambda x: x[1])
            warnings.warn(
                f"LiSSA did not reach tol={o.tol:g} within depth={o.depth} steps in {len(unconverged)} of "
                f"{len(self.groups_)} block groups (largest scale/λ = {worst[1]:.3g} in {worst[0]!r}; convergence "
                "needs about scale/λ × log(1/tol) steps): raise depth or damping",
                RuntimeWarning,
                stacklevel=3,
            )
        return out
