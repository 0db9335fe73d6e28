"""K-FAC and EK-FAC for LoRA blocks (METHODS.md §11): kronfluence's curvature on fastinf's gradients.

Each block l (a (d_out × d_in) weight whose per-example gradient G_i = Σ_s δ_is x_isᵀ is its row,
flattened row-major) has Kronecker factors A_l (d_in × d_in) and S_l (d_out × d_out), accumulated by
the capture (``collector.collect(..., factors=True)``) or given as ``factors=``. With
A_l = Q_A diag(a) Q_Aᵀ and S_l = Q_S diag(σ) Q_Sᵀ (float64 eigendecompositions, once, at fit):

    I(i, t) = − Σ_l ⟨ Q_Sᵀ T_l Q_A ⊘ (Λ_l + λ_l), Q_Sᵀ G_il Q_A ⟩,

with Λ_jk = σ_j a_k (K-FAC) or Λ_jk = (1/n) Σ_i ((Q_Sᵀ G_i Q_A)_jk)² (EK-FAC: the eigenvalues
corrected from the stored per-example gradients, in one streamed pass; no second capture).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..distributed import all_reduce_sum
from ..gradients.factors import check_factors
from ..gradients.gradient_set import GradientSet
from .base import Estimator, EstimatorOptions, register

__all__ = ["EKFAC", "KFAC"]


@dataclass
class KFACOptions(EstimatorOptions):
    """Options of :class:`KFAC` / :class:`EKFAC`.

    ``damping``: ``"auto"`` = ``damping_factor`` (0.1) × the mean of each block's eigenvalues (Λ_l for
    EK-FAC, σ_j a_k for K-FAC; kronfluence's heuristic), a positive float for every block, a dict
    block → positive float naming every block (e.g. ``fastinf.select_damping(..., blockwise=True)``), or
    a rule of METHODS.md §10 (resolved per block from the training gradients, where the options accept it).
    ``blockwise`` is ignored: the curvature is block-diagonal by construction.
    """

    damping: Any = field(
        default="auto",
        metadata={"help": "'auto' (damping_factor × mean eigenvalue per block), a float, or a dict block -> float"},
    )
    factors: Any = field(
        default=None,
        repr=False,
        metadata={"help": "block -> (A, S) Kronecker factors; default: those captured with the gradients"},
    )
    eig_dtype: Any = field(default=torch.float64, metadata={"help": "dtype of the eigendecompositions"})

    def __post_init__(self) -> None:
        d = self.damping
        if isinstance(d, Mapping):
            lam = {}
            for k, v in d.items():
                ok = not isinstance(v, (bool, str)) and isinstance(v, (int, float)) and math.isfinite(v) and v > 0
                if not ok:
                    raise ValueError(f"damping[{k!r}] must be a positive finite float, got {v!r}")
                lam[str(k)] = float(v)
            if not lam:
                raise ValueError("damping: an empty dict names no block")
            self.damping = "auto"
            super().__post_init__()
            self.damping = lam
        else:
            super().__post_init__()
        if self.factors is not None and not isinstance(self.factors, Mapping):
            raise ValueError(f"factors must be a mapping block -> (A, S) or None, got {type(self.factors).__name__}")
        if not (isinstance(self.eig_dtype, torch.dtype) and self.eig_dtype in (torch.float32, torch.float64)):
            raise ValueError(f"eig_dtype must be torch.float32 or torch.float64, got {self.eig_dtype!r}")


@register
class KFAC(Estimator):
    """K-FAC influence (METHODS.md §11): block l's curvature ≈ S_l ⊗ A_l, eigenvalues σ_j a_k.

    Factors: ``factors=`` (block → (A, S)), else the training set's own (``GradientSet.factors`` /
    ``GradientStore.factors``, from ``collect(..., factors=True)``). Every training block needs factors.

    Passes over the training gradients: fit 0 (K-FAC) / 1 (EK-FAC's eigenvalues, all-reduced across
    ranks); ``score`` / ``topk`` / ``self_influence`` 1 each. Memory: O(chunk·D + m·D + output) plus
    Σ_l (d_in² + d_out² + d_l) float64 numbers (eigenvectors and Λ).

    Raises (``fit``):
        ValueError: a block without factors ("no Kronecker factors for block ..."), factors whose sizes
            do not match a block's width, a damping dict that does not name every block, λ = 0 from
            ``"auto"`` on a block whose eigenvalues are all zero.
    """

    name = "kfac"
    Options = KFACOptions
    corrected: ClassVar[bool] = False  # EK-FAC: eigenvalues from the gradients

    def _factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        train = self.train_
        given = self.options.factors
        src = given if given is not None else getattr(train, "factors", None)
        what = "factors" if given is not None else "the training gradients' factors"
        facs = check_factors(src or {}, train.dims, what=what)
        missing = [k for k in train.names if k not in facs]
        if missing:
            raise ValueError(
                f"{type(self).__name__}: no Kronecker factors for block {missing[0]!r}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + ": capture with collector.collect(..., factors=True) (fastinf grads --factors) or pass "
                "factors={block: (A, S)}"
            )
        return facs

    def _fit(self) -> None:
        edt = self.options.eig_dtype
        self.eig_: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for k, (A, S) in self._factors().items():
            if k not in self.train_.dims:
                continue
            a, qa = torch.linalg.eigh(((A + A.T) / 2).to(edt))
            s, qs = torch.linalg.eigh(((S + S.T) / 2).to(edt))
            self.eig_[k] = (qa.to(self.device_), a.clamp_min(0).to(self.device_), qs.to(self.device_), s.clamp_min(0))
        self.shapes_ = {k: (v[2].shape[0], v[0].shape[0]) for k, v in self.eig_.items()}  # (d_out, d_in)
        if self.corrected:
            self.eigenvalues_ = self._corrected_eigenvalues()
        else:
            self.eigenvalues_ = {k: torch.outer(v[3].to(self.device_), v[1]) for k, v in self.eig_.items()}
        self.lam_ = self._lambdas()
        self.inv_ = {
            k: 1.0 / (self.eigenvalues_[k].to(torch.float64) + self.lam_[k]) for k in self.train_.names
        }  # (d_out, d_in) float64

    def _rotate(self, k: str, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(c, d_out·d_in) rows -> Q_Sᵀ X Q_A, (c, d_out, d_in), in ``dtype``."""
        qa, _, qs, _ = self.eig_[k]
        d_out, d_in = self.shapes_[k]
        X = x.reshape(-1, d_out, d_in).to(dtype)
        return qs.T.to(dtype) @ X @ qa.to(dtype)

    def _corrected_eigenvalues(self) -> dict[str, torch.Tensor]:
        """Λ_l = (1/n) Σ_i (Q_Sᵀ G_i Q_A)² elementwise: one pass over this rank's rows, all-reduced."""
        names = self.train_.names
        dt = torch.promote_types(self.compute_dtype_, torch.float32)
        acc = {k: torch.zeros(self.shapes_[k], dtype=torch.float64, device=self.device_) for k in names}
        for _, _, ch in self._pass():
            for k in names:
                acc[k] += self._rotate(k, ch[k], dt).square().sum(0, dtype=torch.float64)
        if self.distributed_:
            flat = all_reduce_sum(torch.cat([acc[k].reshape(-1) for k in names]))
            off = 0
            for k in names:
                acc[k] = flat[off : off + acc[k].numel()].reshape(acc[k].shape)
                off += acc[k].numel()
        return {k: v / self.n_ for k, v in acc.items()}

    def _lambdas(self) -> dict[str, float]:
        d = self.options.damping
        names = self.train_.names
        if isinstance(d, Mapping):
            missing = [k for k in names if k not in d]
            if missing:
                raise ValueError(
                    f"{type(self).__name__}: the damping dict names no λ for block {missing[0]!r} "
                    f"({len(missing)} block(s) missing)"
                )
            return {k: float(d[k]) for k in names}
        if isinstance(d, (int, float)):
            return dict.fromkeys(names, float(d))
        if d != "auto":  # a rule of METHODS.md §10 resolved from the training gradients, per block
            return {k: Estimator.damping_for(self, [k]) for k in names}
        out = {}
        for k in names:
            lam = self.options.factor * float(self.eigenvalues_[k].mean())
            if not lam > 0:
                raise ValueError(
                    f"{type(self).__name__}: damping='auto' gives λ = 0 for block {k!r} (its "
                    f"{'gradients' if self.corrected else 'factors'} are all zero); pass an explicit damping "
                    "(a positive float or a dict block -> float)"
                )
            out[k] = lam
        return out

    def block_groups(self) -> list[list[str]]:
        return [[k] for k in self._check_fitted().names]

    def damping_for(self, group: list[str], eigvals: Any = None) -> float:
        """λ of a (one-block) group, as chosen at fit."""
        return self.lam_[group[0]]

    @property
    def lambdas_(self) -> dict[str, float]:
        """λ_l used for each block."""
        self._check_fitted()
        return dict(self.lam_)

    def _test_side(self, test: GradientSet) -> dict[str, torch.Tensor]:
        """Q_S ((Q_Sᵀ T Q_A) ⊘ (Λ + λ)) Q_Aᵀ per block, in float64, returned in the compute dtype."""
        out = {}
        for k in test.names:
            qa, _, qs, _ = self.eig_[k]
            R = self._rotate(k, test[k], torch.float64) * self.inv_[k]
            out[k] = (qs.to(torch.float64) @ R @ qa.to(torch.float64).T).reshape(test.n, -1).to(self.compute_dtype_)
        return out


@register
class EKFAC(KFAC):
    """EK-FAC influence (METHODS.md §11): the K-FAC eigenbasis Q_S ⊗ Q_A with the eigenvalues corrected
    from the training gradients, Λ_jk = (1/n) Σ_i ((Q_Sᵀ G_i Q_A)_jk)² — one streamed pass at fit (row
    chunks, from memory or a GradientStore; all-reduced across ranks). See :class:`KFAC`."""

    name = "ekfac"
    corrected = True
