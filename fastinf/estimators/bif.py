"""Local Bayesian influence function (Kreer et al. 2025; METHODS.md §8).

BIF(i, j) = −Cov_draws(L_i, L_j) over SGLD draws from the localised tempered posterior around the
trained weights, pooled over chains with one global mean: (m, n), positive = harmful, like every
estimator. ``normalize=True`` gives −Pearson correlation. ``self_influence()`` = −Var(L_i).
Losses at the reference weights (``LossTrace.reference``) are subtracted before accumulating, and
draws are merged block by block with the pairwise update (never Σxy − Nμμᵀ).
Laplace limit: for a regular model, β·BIF ≈ the damped influence with λ = γ/(nβ).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..ops import trace_cov
from ..ops.trace_cov import CoMoments
from ..traces.loss_trace import LossTrace
from .registry import register
from .trace_base import TraceEstimator

# TraceEstimator lives in base.py (shared with the gradient estimators' registry facts); re-exported here
__all__ = ["BIF", "TraceEstimator"]


@dataclass
class BIFOptions:
    normalize: bool = field(default=False, metadata={"help": "−Pearson correlation instead of −covariance"})
    block: int = field(default=256, metadata={"help": "draws merged per pairwise update"})
    backend: str = field(default="auto", metadata={"help": "'auto' | 'cuda' | 'triton' | 'torch' for trace_cov"})

    def __post_init__(self) -> None:
        if not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"block must be a positive int, got {self.block!r}")
        if self.backend not in ("auto", "cuda", "triton", "torch"):
            raise ValueError(f"backend must be 'auto', 'cuda', 'triton' or 'torch', got {self.backend!r}")


@register
class BIF(TraceEstimator):
    """BIF from posterior loss traces: ``BIF().fit(traces["train"]).score(traces["test"])``."""

    name = "bif"
    Options = BIFOptions

    @staticmethod
    def _centred(tr: LossTrace) -> torch.Tensor:
        x = tr.losses.to(torch.float64)
        return x - tr.reference.to(torch.float64) if tr.reference is not None else x

    def fit(self, train: Any) -> BIF:
        train = self._coerce(train, "train")
        if train.T < 2:
            raise ValueError(f"BIF needs at least 2 draws, got {train.T}")
        self.train_ = train
        self._X = self._centred(train)
        if self.options.normalize:
            sd = self._X.std(0)
            if bool((sd == 0).any()):
                i = int(torch.nonzero(sd == 0)[0, 0])
                raise ValueError(f"normalize=True: the train trace of example {i} has zero variance")
        return self

    def _prep(self, test: Any) -> torch.Tensor:
        train = self._check_fitted()
        test = self._coerce(test, "test")
        if test.T != train.T:
            raise ValueError(f"test trace has {test.T} draws but the train trace has {train.T}")
        if train.chains is not None and test.chains is not None and not torch.equal(train.chains, test.chains):
            raise ValueError("train and test traces come from different chains/draws")
        return self._centred(test)

    def score(self, test: Any, *, reduce: str | None = None) -> torch.Tensor:
        """(m, n) = −Cov(L_j, L_i) over draws (or −correlation); ``reduce="mean"`` (``"sum"``) → (n,)."""
        return super().score(test, reduce=reduce)

    def _score_cols(self, test: Any, start: int, stop: int) -> torch.Tensor:
        Y = self._prep(test)
        X = self._X if (start, stop) == (0, self._X.shape[1]) else self._X[:, start:stop]
        return trace_cov(X, Y, self.options.normalize, backend=self.options.backend, block=self.options.block)

    def self_influence(self) -> torch.Tensor:
        """−Var(L_i) over draws (−1 when normalize=True)."""
        self._check_fitted()
        acc = CoMoments(self._X.shape[1], 0, dtype=torch.float64)
        for s in range(0, self._X.shape[0], self.options.block):
            acc.update(self._X[s : s + self.options.block], self._X[s : s + self.options.block, :0])
        var = acc.sxx / (acc.count - 1)
        return -torch.ones_like(var) if self.options.normalize else -var
