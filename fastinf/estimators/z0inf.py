"""Z0-Inf (Kokhlikyan, Chaudhuri, Mahloujifar 2025; METHODS.md §7): zeroth-order influence from
per-example losses at training checkpoints and the checkpoints' Gram matrix Γ = ΘΘᵀ.

Finite-difference gradient of example z at checkpoint t from its neighbours s ∈ 𝒩_t:
    ĝ_t(z) = (1/K_t) Σ_s (L[t, z] − L[s, z]) Δ_{t,s} / N_{t,s},  Δ_{t,s} = θ_t − θ_s, N_{t,s} = ‖Δ_{t,s}‖²,
    Z(i, j) = (1/T) Σ_t ⟨ĝ_t(z_i), ĝ_t(z_j)⟩.
Everything needs only Γ: with C_t[s, s'] = ⟨Δ_{t,s}, Δ_{t,s'}⟩ / (K_t² N_{t,s} N_{t,s'}) = R_tᵀ R_t, the
embedding e(z) = concat_t R_t δ_t(z) / √T (δ_t(z)_s = L[t, z] − L[s, z]) gives Z = E_teᵀ E_tr: one
GEMM with inner size Σ_t K_t ≤ T·K.

``score`` returns −Z (Z > 0 = aligned loss changes = a proponent), so positive = harmful as for
every fastinf estimator; ``self_influence`` likewise returns −Σ_t ‖ĝ_t‖² ("fd"), −Var_t(L) ("var"), or
the reference code's finite-difference self-influence, negated ("reference"; see its docstring).

Options from the reference code (facebookresearch/z0inf): ``center_losses`` (subtract each
checkpoint row's mean over the set's examples before differencing), ``weight_by_correlation``
(multiply by the Spearman correlation over checkpoints of the raw loss trajectories; a constant
trajectory gets weight 0; note that for an *opposing* pair both Z and the correlation are negative, so
the signed product turns opponents into proponents — ``"abs"`` weights by |ρ| and keeps the sign
of Z), ``window="tail"`` (the reference's neighbours: the last K//2 checkpoints of the run for every
t, excluding t) and ``normalization="reference"`` (the reference's coefficient
⟨Δ_s, Δ_s'⟩ / (N_s² N_s'²): no 1/K_t², and N divided twice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..traces.loss_trace import LossTrace
from .registry import register
from .trace_base import TraceEstimator

__all__ = ["Z0Inf", "neighbor_sets", "spearman_matrix"]


def neighbor_sets(T: int, K: int, window: str = "window") -> list[list[int]]:
    """𝒩_t for t = 0..T−1: ``window`` = the K nearest indices (ties toward the smaller index);
    ``tail`` = the last K//2 indices of the run, excluding t. K is Z0Inf's ``neighbors`` option.

    Raises:
        ValueError: too few checkpoints for K (``window``: T ≥ K + 1; ``tail``: K ≥ 2 and
            T ≥ K//2 + 1), saying which option to lower or how many checkpoints are needed.
    """
    if window == "window":
        if T < K + 1:
            fewer = f"use fewer neighbors (at most neighbors={T - 1}) or " if T >= 2 else ""
            raise ValueError(
                f"window='window' needs more checkpoints than neighbors (T ≥ K + 1, K = the neighbors option): "
                f"got neighbors={K} and T = {T} checkpoints; {fewer}more checkpoints (at least {K + 1})"
            )
        return [sorted(sorted((s for s in range(T) if s != t), key=lambda s: (abs(s - t), s))[:K]) for t in range(T)]
    if window == "tail":
        h = K // 2
        if h < 1:
            raise ValueError(f"window='tail' uses the last neighbors//2 checkpoints: needs neighbors ≥ 2, got {K}")
        if T < h + 1:
            raise ValueError(
                f"window='tail' needs T ≥ neighbors//2 + 1 checkpoints: got neighbors={K} and T = {T} checkpoints; "
                f"use fewer neighbors or more checkpoints (at least {h + 1})"
            )
        return [[s for s in range(T - h, T) if s != t] for t in range(T)]
    raise ValueError(f"window must be 'window' or 'tail', got {window!r}")


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (1-based) along dim 0, ties averaged, like scipy.stats.rankdata."""
    T = x.shape[0]
    order = torch.argsort(x, dim=0, stable=True)
    sorted_x = torch.gather(x, 0, order)
    pos = torch.arange(1, T + 1, dtype=torch.float64, device=x.device)[:, None].expand_as(x)
    # average the positions of equal values (group starts where the value changes)
    new = torch.ones_like(sorted_x, dtype=torch.bool)
    new[1:] = sorted_x[1:] != sorted_x[:-1]
    gid = torch.cumsum(new.long(), 0) - 1  # group id per sorted position
    sums = torch.zeros_like(pos).scatter_add_(0, gid, pos)
    cnts = torch.zeros_like(pos).scatter_add_(0, gid, torch.ones_like(pos))
    avg = torch.gather(sums / cnts.clamp_min(1), 0, gid)
    out = torch.empty_like(avg)
    out.scatter_(0, order, avg)
    return out


def _standardised_ranks(x: torch.Tensor) -> torch.Tensor:
    r = _ranks(x.to(torch.float64))
    r = r - r.mean(0, keepdim=True)
    sd = r.norm(dim=0, keepdim=True)
    return torch.where(sd > 0, r / torch.where(sd > 0, sd, torch.ones_like(sd)), torch.zeros_like(r))


def spearman_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation over dim 0 between every column of b (T, m) and of a (T, n): (m, n).
    Columns with constant values get correlation 0."""
    return _standardised_ranks(b).T @ _standardised_ranks(a)


@dataclass
class Z0InfOptions:
    neighbors: int = field(default=4, metadata={"help": "K, neighbour checkpoints per checkpoint"})
    window: str = field(default="window", metadata={"help": "'window' (nearest K) | 'tail' (reference code)"})
    center_losses: bool = field(default=True, metadata={"help": "subtract each checkpoint's mean loss"})
    weight_by_correlation: bool | str = field(
        default=True, metadata={"help": "× Spearman of the raw loss trajectories (True), × |Spearman| ('abs'), or off"}
    )
    normalization: str = field(default="consistent", metadata={"help": "'consistent' | 'reference'"})

    def __post_init__(self) -> None:
        if not isinstance(self.neighbors, int) or self.neighbors < 1:
            raise ValueError(f"neighbors must be a positive int, got {self.neighbors!r}")
        if self.window not in ("window", "tail"):
            raise ValueError(f"window must be 'window' or 'tail', got {self.window!r}")
        if self.weight_by_correlation not in (True, False, "abs"):
            raise ValueError(f"weight_by_correlation must be True, False or 'abs', got {self.weight_by_correlation!r}")
        if self.normalization not in ("consistent", "reference"):
            raise ValueError(f"normalization must be 'consistent' or 'reference', got {self.normalization!r}")


@register
class Z0Inf(TraceEstimator):
    """Z0-Inf: ``Z0Inf().fit(LossTrace(L_train, gram)).score(LossTrace(L_test))`` → (m, n) = −Z."""

    name = "z0inf"
    Options = Z0InfOptions

    def fit(self, train: Any) -> Z0Inf:
        train = self._coerce(train, "train")
        if train.checkpoints_gram is None:
            raise ValueError("Z0Inf needs the checkpoints' Gram matrix: LossTrace(losses, checkpoints_gram)")
        o = self.options
        G = train.checkpoints_gram.to(torch.float64)
        T = train.T
        self.neighbors_ = neighbor_sets(T, o.neighbors, o.window)
        self.factors_: list[torch.Tensor] = []
        for t, nb in enumerate(self.neighbors_):
            if not nb:
                self.factors_.append(torch.zeros(0, 0, dtype=torch.float64))
                continue
            s = torch.tensor(nb)
            N = G[t, t] - 2 * G[t, s] + G[s, s]  # (K_t,)
            if bool((N <= 1e-12 * G.diagonal().abs().max().clamp_min(1e-300)).any()):
                bad = nb[int(torch.nonzero(N <= 1e-12 * G.diagonal().abs().max().clamp_min(1e-300))[0, 0])]
                raise ValueError(f"checkpoints {t} and {bad} are identical (‖θ_t − θ_s‖² = 0): drop duplicates")
            inner = G[t, t] - G[t, s][:, None] - G[t, s][None, :] + G[s][:, s]  # ⟨Δ_{t,s}, Δ_{t,s'}⟩
            if o.normalization == "consistent":
                C = inner / (len(nb) ** 2 * torch.outer(N, N))
            else:
                C = inner / torch.outer(N * N, N * N)
            C = (C + C.T) / 2
            w, V = torch.linalg.eigh(C)
            self.factors_.append(w.clamp_min(0).sqrt()[:, None] * V.T)  # R_t, C = R_tᵀ R_t
        self.train_ = train
        self.gram_ = G
        self.E_train_ = self._embed(train)
        self._ranks_train = _standardised_ranks(train.losses) if o.weight_by_correlation else None
        return self

    def _embed(self, tr: LossTrace) -> torch.Tensor:
        """e(z) for every example of ``tr``: (Σ_t K_t, n)."""
        L = tr.losses.to(torch.float64)
        if self.options.center_losses:
            L = L - L.mean(1, keepdim=True)
        parts = []
        for t, (nb, R) in enumerate(zip(self.neighbors_, self.factors_, strict=True)):
            if not nb:
                continue
            delta = L[t][None, :] - L[nb]  # (K_t, n)
            parts.append(R @ delta)
        return torch.cat(parts) / math.sqrt(len(self.neighbors_))

    def _prep(self, test: Any) -> LossTrace:
        train = self._check_fitted()
        test = self._coerce(test, "test")
        if test.T != train.T:
            raise ValueError(f"test losses have T = {test.T} checkpoints but the train losses have T = {train.T}")
        if test.checkpoints_gram is not None and not torch.allclose(test.checkpoints_gram, self.gram_, rtol=1e-6):
            raise ValueError("test trace carries a different checkpoints_gram than the train trace")
        return test

    def _score_cols(self, test: Any, start: int, stop: int) -> torch.Tensor:
        test = self._prep(test)
        Z = self._embed(test).T @ self.E_train_[:, start:stop]
        if self.options.weight_by_correlation:
            rho = _standardised_ranks(test.losses).T @ self._ranks_train[:, start:stop]
            Z = Z * (rho.abs() if self.options.weight_by_correlation == "abs" else rho)
        return -Z

    def score(self, test: Any, *, reduce: str | None = None) -> torch.Tensor:
        """(m, n) = −Z(i, j); ``reduce="mean"`` (``"sum"``) aggregates over the m queries → (n,)."""
        return super().score(test, reduce=reduce)

    def self_influence(self, kind: str = "fd") -> torch.Tensor:
        """Self-influence of every training example, (n,), negated like every fastinf score.

        * ``"fd"``: −Σ_t ‖ĝ_t(z)‖² = −T‖e(z)‖², i.e. T × the diagonal of the train-on-train Z (before
          correlation weighting, which is 1 on the diagonal), with the estimator's options
          (``center_losses``, ``window``, ``normalization``, ĝ divided by K_t = |𝒩_t|).
        * ``"var"``: −unbiased variance over t of L[t, z] (the reference's ``z_self_inf_var``).
        * ``"reference"``: −the reference code's finite-difference self-influence
          (facebookresearch/z0inf, ``z_self_inf_finite_diff``):
          −Σ_t ‖(1/K) Σ_{s∈𝒩_t} (L[t, z] − L[s, z]) Δ_{t,s} / N_{t,s}‖² with raw losses (no centring),
          Δ/N divided once, K = ``neighbors`` (not |𝒩_t|), no 1/T, and the reference's neighbours
          (the last K//2 checkpoints of the run, excluding t) whatever ``window`` says.
          From Γ only: ‖Σ_s c_s Δ_{t,s}‖² = Σ_{s,s'} c_s c_{s'} ⟨Δ_{t,s}, Δ_{t,s'}⟩.
        """
        train = self._check_fitted()
        if kind == "fd":
            return -self.E_train_.pow(2).sum(0) * len(self.neighbors_)
        if kind == "var":
            if train.T < 2:
                raise ValueError("var self-influence needs T ≥ 2 checkpoints")
            return -train.losses.to(torch.float64).var(0, unbiased=True)
        if kind == "reference":
            return -self._reference_self_influence(train)
        raise ValueError(f"kind must be 'fd', 'var' or 'reference', got {kind!r}")

    def _reference_self_influence(self, train: LossTrace) -> torch.Tensor:
        G, K = self.gram_, self.options.neighbors
        L = train.losses.to(torch.float64)  # raw losses
        out = torch.zeros(train.n, dtype=torch.float64)
        for t, nb in enumerate(neighbor_sets(train.T, K, "tail")):
            if not nb:
                continue
            s = torch.tensor(nb)
            N = G[t, t] - 2 * G[t, s] + G[s, s]  # ‖Δ_{t,s}‖², (K_t,)
            if bool((N <= 1e-12 * G.diagonal().abs().max().clamp_min(1e-300)).any()):
                raise ValueError(f"checkpoint {t} equals one of its reference neighbours {nb}: drop duplicates")
            inner = G[t, t] - G[t, s][:, None] - G[t, s][None, :] + G[s][:, s]  # ⟨Δ_{t,s}, Δ_{t,s'}⟩
            C = inner / torch.outer(N, N) / (K * K)
            delta = L[t][None, :] - L[nb]  # (K_t, n)
            out += ((C @ delta) * delta).sum(0)
        return out
