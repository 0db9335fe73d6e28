"""Hessian-free (identity preconditioner, METHODS.md §2) and diagonal Fisher (§6)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..gradients.gradient_set import GradientSet
from .base import Estimator, EstimatorOptions, register

__all__ = ["DiagonalFisher", "HessianFree"]


@dataclass
class HessianFreeOptions(EstimatorOptions):
    normalize: bool = field(default=False, metadata={"help": "divide by n (I = −g_iᵀt_j / n); default: not divided"})


@register
class HessianFree(Estimator):
    """I(i, j) = − g_iᵀ t_j (÷ n with ``normalize=True``). Equals TracIn at one checkpoint. No damping."""

    name = "hessian_free"
    Options = HessianFreeOptions
    uses_damping = False
    requires_positive_damping = False

    def _test_side(self, test: GradientSet) -> dict[str, torch.Tensor]:
        if self.options.normalize:
            return {k: test[k] / self.n_ for k in test.names}
        return {k: test[k] for k in test.names}


@register
class DiagonalFisher(Estimator):
    """I(i, j) = − Σ_ι g_iι t_jι / (G_ιι + λ), G_ιι = (1/n) Σ_i g_iι².

    ``blockwise=False`` (default) uses the global λ rule; ``blockwise=True`` a λ_l per block.
    """

    name = "diagonal_fisher"

    def _fit(self) -> None:
        train = self.train_
        self.inv_diag_ = {}
        for group in self.block_groups():
            lam = self.damping_for(group)
            for k in group:
                colsq = torch.linalg.vector_norm(train[k], dim=0).square().div_(train.n)  # G_ιι, no n×d temporary
                self.inv_diag_[k] = 1.0 / (colsq + lam)

    def _test_side(self, test: GradientSet) -> dict[str, torch.Tensor]:
        return {k: test[k] * self.inv_diag_[k] for k in test.names}
