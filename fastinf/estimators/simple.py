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
    """I(i, j) = − g_iᵀ t_j (÷ n with ``normalize=True``). Equals TracIn at one checkpoint. No damping.

    Passes over the training gradients: fit 0; ``score`` / ``topk`` / ``self_influence`` 1 each.
    Memory: O(chunk·D + m·D + output) (output: (m, n) for ``score``, (m, k) for ``topk``, (n,) for
    ``reduce="mean"`` and ``self_influence``).
    """

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

    Passes over the training gradients: fit 1 (the diagonal and the 'auto' λ together, all-reduced across
    ranks); ``score`` / ``topk`` / ``self_influence`` 1 each. Memory: O(chunk·D + m·D + output) plus the
    diagonal (D).
    """

    name = "diagonal_fisher"

    def _fit(self) -> None:
        n = self.n_
        col = self.column_sq_sums()  # one pass: Σ_i g_iι² (float64), and the per-block sums for λ
        self.inv_diag_ = {}
        for group in self.block_groups():
            lam = self.damping_for(group)
            for k in group:
                self.inv_diag_[k] = (1.0 / (col[k] / n + lam)).to(self.compute_dtype_)

    def _test_side(self, test: GradientSet) -> dict[str, torch.Tensor]:
        return {k: test[k] * self.inv_diag_[k] for k in test.names}
