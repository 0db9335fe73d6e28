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
    """LiSSA influence (see module docstring)."""

    name = "lissa"
    Options = LiSSAOptions

    def _fit(self) -> None:
        self.groups_ = self.block_groups()
        self.lam_ = {tuple(g): self.damping_for(g) for g in self.groups_}
        self.scale_: dict[tuple[str, ...], float] = {}
        for g in self.groups_:
            if self.options.scale is not None:
                s = self.options.scale
            elif self.options.reference_compat:
                s = 1.0
            else:
                s = 1.1 * (self._top_eig(g) + self.lam_[tuple(g)])
            self.scale_[tuple(g)] = float(s)
        self.converged_ = True

    def _gv(self, g: list[str], v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """G v = (1/n) Φ (Φᵀ v) for rows of v: name -> (m, d_l)."""
        train = self.train_
        P = sum(v[k] @ train[k].T for k in g)  # (m, n)
        return {k: (P @ train[k]).div_(self.n_) for k in g}

    def _top_eig(self, g: list[str]) -> float:
        """Largest eigenvalue of G for the group, by power iteration (Rayleigh quotient).

        The start vector of each block is seeded by (seed, block name), so the estimate does not
        depend on the order of the blocks."""
        train = self.train_
        v = {}
        for k in g:
            gen = torch.Generator().manual_seed(self.options.seed * 1_000_003 + zlib.crc32(k.encode()))
            v[k] = torch.randn(1, train.dims[k], generator=gen, dtype=torch.float64).to(train[k])
        est = 0.0
        for _ in range(self.options.power_iters):
            nrm = torch.sqrt(sum(x.pow(2).sum() for x in v.values()))
            if not nrm > 0:
                return 0.0
            v = {k: x / nrm for k, x in v.items()}
            w = self._gv(g, v)
            est = float(sum((w[k] * v[k]).sum() for k in g))  # Rayleigh quotient
            v = w
        return est

    def _test_side(self, test: GradientSet) -> dict[str, torch.Tensor]:
        o = self.options
        out: dict[str, torch.Tensor] = {}
        unconverged: list[tuple[str, float]] = []
        for g in self.groups_:
            lam, s = self.lam_[tuple(g)], self.scale_[tuple(g)]
            t = {k: test[k] for k in g}
            r = {k: test[k].clone() for k in g}
            converged = o.tol == 0
            # error-bound test per test vector: (s/λ)(1 + tol)‖Δr_j‖ ≤ tol‖r_j‖ (see module docstring)
            factor = (s / lam) * (1.0 + o.tol)
            for _ in range(o.depth):
                Gr = self._gv(g, r)
                if o.reference_compat:
                    # DataInf code: r ← t + r − α[(1/n)Σ(gᵀr)g − λr], α = 1/s
                    new = {k: t[k] + r[k] - (Gr[k] - lam * r[k]) / s for k in g}
                else:
                    new = {k: t[k] + r[k] - (Gr[k] + lam * r[k]) / s for k in g}
                if o.tol > 0:
                    if o.reference_compat:
                        num = sum(float((new[k] - r[k]).pow(2).sum()) for k in g)
                        den = sum(float(new[k].pow(2).sum()) for k in g)
                        done = num <= (o.tol**2) * den
                    else:
                        num = sum((new[k] - r[k]).pow(2).sum(1) for k in g)  # ‖ρ_j‖², per test vector j
                        den = sum(r[k].pow(2).sum(1) for k in g)  # ‖r_j‖² = s²‖h_j‖²
                        done = bool((num * factor**2 <= den * o.tol**2).all())
                    r = new
                    if done:
                        converged = True
                        break
                else:
                    r = new
            if not converged:
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
