"""RRInf (Tu, Chen, Du 2025; METHODS.md §5): ridge regression solved by normalised SGD.

Ridge form, υ = −n v̄ (Υ = −n T for m tests, one column each):

    min_ω (1/D) Σ_ι (φ_ιᵀ ω − υ_ι)² + λ̃ ‖ω‖²,   λ̃ = nλ/D,

where φ_ι ∈ Rⁿ is parameter coordinate ι across the training examples. The paper's iteration
draws one coordinate ("neuron") per step and takes the *row-normalised* step

    ω ← ω − η [ 2 (φ_ιᵀω − υ_ι) φ_ι / ‖φ_ι‖² + 2 λ̃ ω ].

The result ω (n,) is the influence of each training example (positive = harmful), like ``Exact``.

What users must know (the estimator does what the paper does; these are its properties):

* Row-normalised uniform sampling is unbiased for the *weighted* ridge problem whose fixed point is
  ω_W = (Φᵀ W Φ + nλ I)⁻¹ Φᵀ W υ with W = diag(1/‖φ_ι‖²) — :class:`RRInfFixedPoint` — not for
  the exact influence. They agree only when all row norms are equal (up to a rescaling of λ).
* At the paper's settings (η = 0.01, T = 1000 ≪ D) the iterate is far from converged; to first
  order it is a coordinate-subsampled diagonal-Fisher influence, and it depends on the seed:
  report several seeds.
* Zero rows are skipped (a step on a zero row is a no-op), never divided by zero.
* The row-normalised data term does not change when all gradients are multiplied by c, but the
  'auto' λ grows with c², so RRInf and its fixed point (unlike exact, DataInf, LiSSA) are not
  invariant to the scale of the gradients: their ranking depends on the loss scale.

Sampling modes: ``"neuron"`` (one coordinate per step), ``"minibatch"`` (``batch_size``
coordinates per step, row terms averaged), ``"layer"`` (one block per step, all its rows, each
normalised, averaged over the block's non-zero rows; regulariser nλ_l/D with a per-block λ_l).
Draws are made once at ``fit`` from ``seed``; every later ``score`` reuses them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..gradients.gradient_set import GradientSet
from ..ops import rrinf_row_updates
from .base import Estimator, EstimatorOptions, register
from .exact import Exact

__all__ = ["RRInf", "RRInfFixedPoint"]

_SAMPLING = ("neuron", "layer", "minibatch")


@dataclass
class RRInfOptions(EstimatorOptions):
    lr: float = field(default=0.01, metadata={"help": "learning rate η (paper: 0.01)"})
    iters: int = field(default=1000, metadata={"help": "SGD steps T (paper: 1000)"})
    sampling: str = field(default="neuron", metadata={"help": "'neuron' | 'minibatch' | 'layer'"})
    batch_size: int = field(default=1, metadata={"help": "coordinates per step in 'minibatch' mode"})
    lr_decay: float = field(default=0.0, metadata={"help": "η_t = lr / (1 + lr_decay · t); 0: constant (paper)"})
    seed: int = field(default=0, metadata={"help": "seed of the coordinate / layer draws"})
    test_chunk_size: int | None = field(default=None, metadata={"help": "tests per pass in topk/self_influence"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"iters must be a positive int, got {self.iters!r}")
        if self.sampling not in _SAMPLING:
            raise ValueError(f"sampling must be one of {_SAMPLING}, got {self.sampling!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.sampling == "neuron" and self.batch_size != 1:
            raise ValueError("batch_size > 1 needs sampling='minibatch'")
        if self.lr_decay < 0:
            raise ValueError(f"lr_decay must be >= 0, got {self.lr_decay}")
        if self.test_chunk_size is not None and self.test_chunk_size < 1:
            raise ValueError(f"test_chunk_size must be a positive int, got {self.test_chunk_size}")


@register
class RRInf(Estimator):
    """RRInf influence by normalised SGD (see module docstring). Global λ rule by default."""

    name = "rrinf"
    Options = RRInfOptions

    def _fit(self) -> None:
        o, train = self.options, self.train_
        gen = torch.Generator().manual_seed(o.seed)
        self.lrs_ = o.lr / (1.0 + o.lr_decay * torch.arange(o.iters, dtype=torch.float64))
        if o.sampling == "layer":
            self.set_draws(torch.randint(len(train.names), (o.iters,), generator=gen))
        else:
            b = o.batch_size if o.sampling == "minibatch" else 1
            self.set_draws(torch.randint(train.dim, (o.iters * b,), generator=gen))

    def set_draws(self, draws: torch.Tensor) -> RRInf:
        """Replace the random draws: coordinate indices in [0, D) (``iters·batch_size`` of them), or for
        ``sampling="layer"`` block indices in [0, L) (``iters`` of them), e.g. to replay another code's RNG."""
        o, train = self.options, self._check_fitted()
        n, D = self.n_, train.dim
        draws = torch.as_tensor(draws, dtype=torch.int64).flatten().cpu()
        if o.sampling == "layer":
            if draws.numel() != o.iters or (draws.numel() and (draws.min() < 0 or draws.max() >= len(train.names))):
                raise ValueError(f"need {o.iters} layer indices in [0, {len(train.names)})")
            self.layer_draws_ = draws.tolist()
            self.layer_reg_, self.layer_inv_ = {}, {}
            for k in train.names:
                self.layer_reg_[k] = n * self.damping_for([k]) / D
                nsq = torch.linalg.vector_norm(train[k], dim=0).square()  # (d_l,): row norms of Φ_l
                nz = nsq > 0
                self.layer_inv_[k] = torch.where(nz, 1.0 / torch.where(nz, nsq, torch.ones_like(nsq)), 0.0)
            return self
        b = o.batch_size if o.sampling == "minibatch" else 1
        if draws.numel() != o.iters * b or (draws.numel() and (draws.min() < 0 or draws.max() >= D)):
            raise ValueError(f"need {o.iters * b} coordinate indices in [0, {D})")
        self.reg_ = n * self.damping_for(train.names) / D
        self.coords_ = draws
        self.block_of_, self.col_of_ = self._locate(draws)
        self.step_batch_ = b
        return self

    _SEGMENT_ROWS = 1 << 22  # drawn rows gathered at once: segment × n ≤ 4M entries

    def _gather(self, gs: GradientSet, lo: int, hi: int) -> torch.Tensor:
        """The drawn coordinates lo..hi of ``gs`` as rows: (hi − lo, gs.n) (φ_ι for the training set)."""
        block, col = self.block_of_[lo:hi], self.col_of_[lo:hi]
        out = torch.empty(hi - lo, gs.n, dtype=self.compute_dtype_, device=gs.device)
        for bi, k in enumerate(gs.names):
            sel = torch.nonzero(block == bi).flatten()
            if sel.numel():
                out[sel.to(out.device)] = gs[k][:, col[sel].to(gs.device)].T.to(out.dtype)
        return out

    def _locate(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dims = torch.tensor(list(self.train_.dims.values()))
        ends = torch.cumsum(dims, 0)
        block = torch.searchsorted(ends, coords, right=True)
        col = coords - (ends - dims)[block]
        return block, col

    def _omega(self, test: GradientSet) -> torch.Tensor:
        """Ω (n, m) after all steps, for the tests in ``test``."""
        o, train = self.options, self.train_
        m = test.n
        omega = torch.zeros(self.n_, m, dtype=self.compute_dtype_, device=train.device)
        lrs = self.lrs_.to(device=train.device, dtype=self.compute_dtype_)
        if o.sampling != "layer":
            # stream over segments of steps so that memory stays O(segment · n), whatever `iters` is
            b = self.step_batch_
            steps_per_seg = max(1, self._SEGMENT_ROWS // (b * max(self.n_ + m, 1)))
            for s0 in range(0, o.iters, steps_per_seg):
                s1 = min(s0 + steps_per_seg, o.iters)
                rows = self._gather(train, s0 * b, s1 * b)
                targets = self._gather(test, s0 * b, s1 * b).mul_(-self.n_)  # Υ = −n T
                omega = rrinf_row_updates(rows, targets, omega, lrs[s0:s1], self.reg_, b, backend=o.backend)
            return omega
        for t, bi in enumerate(self.layer_draws_):
            k = train.names[bi]
            inv = self.layer_inv_[k]
            cnt = int((inv > 0).sum())
            if cnt == 0:
                continue
            X = train[k]  # (n, d_l); Φ_l = Xᵀ
            E = X.T @ omega + self.n_ * test[k].T  # Φ_l Ω − Υ_l, (d_l, m)
            upd = (X @ (E * inv[:, None])).mul_(2.0 / cnt)
            upd.add_(omega, alpha=2.0 * self.layer_reg_[k])
            omega.sub_(upd, alpha=float(lrs[t]))
        return omega

    def _score(self, test: GradientSet) -> torch.Tensor:
        return self._omega(test).T.contiguous()

    def _test_chunks(self, m: int) -> int:
        if self.options.test_chunk_size is not None:
            return self.options.test_chunk_size
        return max(1, min(m, (1 << 24) // max(self.n_, 1)))

    def _topk(self, test: GradientSet, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # test columns of Ω evolve independently: chunk over tests, never form (m, n)
        vals, idx = [], []
        step = self._test_chunks(test.n)
        for s in range(0, test.n, step):
            sc = self._omega(test.subset(slice(s, s + step))).T
            v, i = torch.topk(sc, k, dim=1, largest=largest)
            vals.append(v)
            idx.append(i)
        return torch.cat(vals), torch.cat(idx)

    def self_influence(self) -> torch.Tensor:
        """Ω_ii with each training gradient as its own test (tests processed in chunks)."""
        train = self._check_fitted()
        out = []
        step = self._test_chunks(train.n)
        for s in range(0, train.n, step):
            e = min(s + step, train.n)
            om = self._omega(train.subset(slice(s, e)))  # (n, c)
            out.append(om[torch.arange(s, e, device=om.device), torch.arange(e - s, device=om.device)])
        return torch.cat(out)


@dataclass
class RRInfFixedPointOptions(EstimatorOptions):
    sampling: str = field(default="neuron", metadata={"help": "which RRInf iteration's fixed point"})
    solve: str = field(default="auto", metadata={"help": "'auto' | 'n' | 'd' (as Exact)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sampling not in _SAMPLING:
            raise ValueError(f"sampling must be one of {_SAMPLING}, got {self.sampling!r}")
        if self.solve not in ("auto", "n", "d"):
            raise ValueError(f"solve must be 'auto', 'n' or 'd', got {self.solve!r}")


@register
class RRInfFixedPoint(Estimator):
    """Closed form of the weighted ridge problem RRInf's normalised SGD targets (METHODS.md §5).

    With sampling weights a_ι (1/D for neuron/minibatch sampling, 1/(L·d_l) for layer sampling) and
    row norms ‖φ_ι‖², the expected step vanishes at

        ω_W = (Σ_ι a_ι φ_ι φ_ιᵀ / ‖φ_ι‖² + λ̄ I)⁻¹ Σ_ι a_ι υ_ι φ_ι / ‖φ_ι‖²,

    with λ̄ = nλ/D (neuron) or mean_l nλ_l/D (layer). For neuron sampling this is
    (ΦᵀWΦ + nλI)⁻¹ΦᵀWυ, W = diag(1/‖φ_ι‖²). It is computed as ``Exact`` on coordinate-rescaled
    gradients g̃_ι = g_ι·√(D a_ι)/‖φ_ι‖ with λ' = D λ̄ / n (zero rows get weight 0). Float64 by default.
    """

    name = "rrinf_fixed_point"
    Options = RRInfFixedPointOptions
    default_dtype = torch.float64
    cast_storage = False

    def _fit(self) -> None:
        o, train = self.options, self.train_
        n, D = self.n_, train.dim
        L = len(train.names)
        self.coord_scale_: dict[str, torch.Tensor] = {}
        for k in train.names:
            nsq = torch.linalg.vector_norm(train[k].to(self.compute_dtype_), dim=0).square()
            a = (1.0 / D) if o.sampling != "layer" else 1.0 / (L * train.dims[k])
            nz = nsq > 0
            self.coord_scale_[k] = torch.where(nz, torch.sqrt(D * a / torch.where(nz, nsq, torch.ones_like(nsq))), 0.0)
        if o.sampling == "layer":
            lam_bar = sum(n * self.damping_for([k]) / D for k in train.names) / L
        else:
            lam_bar = n * self.damping_for(train.names) / D
        self.lambda_eff_ = D * lam_bar / n
        scaled = GradientSet(
            {k: train[k] * self.coord_scale_[k].to(train[k].dtype) for k in train.names}, validate=False
        )
        self.exact_ = Exact(
            damping=self.lambda_eff_, blockwise=False, solve=o.solve, dtype=self.compute_dtype_, backend=o.backend
        ).fit(scaled)

    def _test_side(self, test: GradientSet) -> dict[str, torch.Tensor]:
        scaled = GradientSet({k: test[k] * self.coord_scale_[k] for k in test.names}, validate=False)
        return self.exact_._test_side(scaled)

    def _train_side(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.exact_._train_side(name, start, stop)

    def self_influence(self) -> torch.Tensor:
        return self.exact_.self_influence()
