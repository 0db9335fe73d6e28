"""The base of the estimators that work on loss traces (no gradients): Z0-Inf and the BIF."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..traces.loss_trace import LossTrace
from .base import BaseEstimator, _check_reduce, _reduce, merge_topk

__all__ = ["TraceEstimator"]


class TraceEstimator(BaseEstimator):
    """Base of the estimators that work on :class:`LossTrace` (no gradients): Z0-Inf, BIF.

    Subclasses implement ``fit`` and ``_score_cols(test, start, stop)`` (the (m, stop − start) scores of
    training columns start..stop); ``score`` and ``topk`` are built on it.
    """

    input_kind: ClassVar[str] = "traces"
    uses_damping: ClassVar[bool] = False
    stochastic: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.train_: LossTrace | None = None

    @staticmethod
    def _coerce(t: Any, what: str) -> LossTrace:
        if isinstance(t, LossTrace):
            return t
        if isinstance(t, torch.Tensor):
            return LossTrace(t)
        raise TypeError(f"{what} must be a LossTrace (or a (T, n) tensor of losses), got {type(t).__name__}")

    def _check_fitted(self) -> LossTrace:
        if getattr(self, "train_", None) is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call .fit(train_trace) first")
        return self.train_

    def _score_cols(self, test: Any, start: int, stop: int) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def score(self, test: Any, *, reduce: str | None = None) -> torch.Tensor:
        """(m, n) scores of every query against every training example; ``reduce="mean"`` (or ``"sum"``)
        aggregates over the m queries → (n,). Positive = harmful."""
        _check_reduce(reduce)
        return _reduce(self._score_cols(test, 0, self._check_fitted().n), reduce)

    def topk(self, test: Any, k: int, *, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """k largest (smallest) scores per query, in chunks of training examples: (values (m, k), indices (m, k))."""
        train = self._check_fitted()
        self._check_k(k, train.n)
        test = self._coerce(test, "test")
        vals = idx = None
        chunk = max(1, (1 << 24) // max(test.n, 1))
        for s in range(0, train.n, chunk):
            e = min(s + chunk, train.n)
            vals, idx = merge_topk(vals, idx, self._score_cols(test, s, e), s, k, largest)
        return vals, idx
