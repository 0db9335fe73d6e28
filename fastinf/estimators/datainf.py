"""DataInf (Kwon et al., ICLR 2024; METHODS.md §3).

Per block group (default: per block) with damping λ, the inverse of the damped Fisher is replaced
by the average of rank-one inverses (Sherman–Morrison):

    h(t) = (1/(nλ)) Σ_i [ t − (g_iᵀ t / (λ + ‖g_i‖²)) g_i ],     I(i, j) = − Σ_groups h(t_j)ᵀ g_i.

Two exactly equal forms:

* ``"streaming"``: h(T) for all m tests by one pass over the training gradients in chunks
  (``fastinf.ops.datainf_inverse_sum``), then scores by one more pass. Never holds an n×n matrix;
  cost ≈ 3·m·n·D.
* ``"gram"``: P = T Φ, K = ΦᵀΦ, I = −(1/λ)[P − (P diag(1/(λ + K_ii))) K / n]; cost ≈ n²D + m·n·D + m·n².
  Cheaper when m is large relative to the block width; holds one n×n Gram at a time.

``form="auto"`` picks the cheaper one by that flop count, and the streaming form whenever n exceeds
``gram_max_n``. ``topk`` and ``self_influence`` always stream (self-influence in row chunks of K).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..gradients.gradient_set import GradientSet
from ..ops import datainf_inverse_sum
from .base import Estimator, EstimatorOptions, register

__all__ = ["DataInf"]


@dataclass
class DataInfOptions(EstimatorOptions):
    blockwise: bool = field(default=True, metadata={"help": "one λ_l and one rank-one sum per block (the method)"})
    form: str = field(default="auto", metadata={"help": "'auto' | 'gram' | 'streaming'"})
    gram_max_n: int = field(default=16384, metadata={"help": "never use the Gram form above this n"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.form not in ("auto", "gram", "streaming"):
            raise ValueError(f"form must be 'auto', 'gram' or 'streaming', got {self.form!r}")
        if not isinstance(self.gram_max_n, int) or self.gram_max_n < 1:
            raise ValueError(f"gram_max_n must be a positive int, got {self.gram_max_n!r}")


@register
class DataInf(Estimator):
    """DataInf influence; block-wise by default (``blockwise=False`` treats all blocks as one)."""

    name = "datainf"
    Options = DataInfOptions

    def _fit(self) -> None:
        train = self.train_
        self.groups_ = self.block_groups()
        self.lam_ = {tuple(g): self.options.damping for g in self.groups_}  # 'auto' is filled in below
        # ‖g_i‖² per group, reused by every pass: one pass per block (vector_norm: no n×d temporary);
        # the 'auto' λ follows from the same norms
        self.sqn_ = {tuple(g): sum(torch.linalg.vector_norm(train[k], dim=1).square() for k in g) for g in self.groups_}
        if self.options.damping == "auto":
            for g in self.groups_:
                width = sum(train.dims[k] for k in g)
                lam = self.options.damping_factor * float(self.sqn_[tuple(g)].sum()) / (train.n * width)
                if not lam > 0:
                    raise self._zero_damping_error()
                self.lam_[tuple(g)] = lam

    @property
    def lambdas_(self) -> dict[str, float]:
        return {k: self.lam_[tuple(g)] for g in self.groups_ for k in g}

    # --------------------------------------------------------------------------- streaming
    def _test_side(self, test: GradientSet) -> dict[str, torch.Tensor]:
        train, n = self.train_, self.n_
        chunk = self._chunk(test.n)
        out: dict[str, torch.Tensor] = {}
        for g in self.groups_:
            lam, sqn = self.lam_[tuple(g)], self.sqn_[tuple(g)]
            if len(g) == 1:
                k = g[0]
                out[k] = datainf_inverse_sum(
                    train[k], test[k], lam, backend=self.options.backend, sq_norms=sqn, chunk_size=chunk
                )
                continue
            S = {k: torch.zeros_like(test[k]) for k in g}
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                P = sum(test[k] @ train[k][s:e].T for k in g)  # (m, c)
                C = P / (lam + sqn[s:e])
                for k in g:
                    S[k].addmm_(C, train[k][s:e])
            for k in g:
                out[k] = (test[k] - S[k] / n) / lam
        return out

    # --------------------------------------------------------------------------- gram
    def _use_gram(self, m: int) -> bool:
        form, n = self.options.form, self.n_
        if form != "auto":
            return form == "gram"
        if n > self.options.gram_max_n:
            return False
        D = self.train_.dim
        return n * n * D + m * n * D + m * n * n < 3 * m * n * D

    def _score(self, test: GradientSet) -> torch.Tensor:
        if not self._use_gram(test.n):
            return super()._score(test)
        train, n = self.train_, self.n_
        out = None
        for g in self.groups_:
            lam, sqn = self.lam_[tuple(g)], self.sqn_[tuple(g)]
            P = sum(test[k] @ train[k].T for k in g)  # (m, n)
            K = sum(train[k] @ train[k].T for k in g)  # (n, n)
            I_g = (P - (P / (lam + sqn)) @ K / n) / lam
            out = I_g if out is None else out.add_(I_g)
        return out.neg_()

    def self_influence(self) -> torch.Tensor:
        """−(1/λ)[‖g_i‖² − (1/n) Σ_k K_ik² / (λ + K_kk)] summed over groups, in row chunks of K."""
        train, n = self._check_fitted(), self.n_
        chunk = self._chunk(n)
        out = torch.zeros(n, dtype=self.compute_dtype_, device=train.device)
        for g in self.groups_:
            lam, sqn = self.lam_[tuple(g)], self.sqn_[tuple(g)]
            w = 1.0 / (lam + sqn)
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                Kc = sum(train[k][s:e] @ train[k].T for k in g)  # (c, n)
                out[s:e] -= (sqn[s:e] - (Kc.pow(2) @ w) / n) / lam
        return out
