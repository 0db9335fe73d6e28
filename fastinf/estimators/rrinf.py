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
* Zero rows (coordinates with no gradient in any training example, e.g. ``lora_A`` while
  ``lora_B = 0`` at initialisation) are never divided by zero: a step on a zero row has a zero data
  term, but its regulariser still applies (METHODS.md §5), as the reference's update
  ω ← ω − η[2eφ/‖φ‖² + 2λ̃ω] does for every drawn row. So the iteration converges to the same
  weighted ridge problem (W = 0 on zero rows) that :class:`RRInfFixedPoint` solves. (Skipping the
  whole step instead would shrink the regulariser to p·nλ, p the share of non-zero rows.)
* The row-normalised data term does not change when all gradients are multiplied by c, but the
  'auto' λ grows with c², so RRInf and its fixed point (unlike exact, DataInf, LiSSA) are not
  invariant to the scale of the gradients: their ranking depends on the loss scale.

Sampling modes: ``"neuron"`` (one coordinate per step), ``"minibatch"`` (``batch_size``
coordinates per step, row terms averaged over the batch, zero rows counting as zero), ``"layer"``
(one block per step, all its rows, each normalised, averaged over the block's d_l rows like the
reference's 2/d_l; regulariser nλ_l/D with a per-block λ_l; with ``damping="auto"`` an all-zero block
gets λ_l = 0, so its steps are no-ops). The problem is global (one ω for all blocks): ``blockwise=True``
is rejected.
Draws are made once at ``fit`` from ``seed``; every later ``score`` reuses them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..gradients.gradient_set import GradientSet
from ..ops import rrinf_row_updates
from .base import Estimator, EstimatorOptions, register
from .exact import Exact

__all__ = ["RRInf", "RRInfFixedPoint"]

_SAMPLING = ("neuron", "layer", "minibatch")


def _reject_blockwise(blockwise: bool, who: str) -> None:
    if blockwise:
        raise ValueError(
            f"{who}: blockwise=True is not supported (the ridge problem is global); "
            "use sampling='layer' for per-block λ_l"
        )


def _layer_lambdas(est: Estimator) -> dict[str, float]:
    """λ_l per block for layer sampling: the dict's entry, the explicit float, or the damping rule applied to
    each block's own gradients (:meth:`Estimator.damping_for`). Under a rule an all-zero block gets λ_l = 0
    (its steps do nothing); only when every block is zero is that an error."""
    train = est.train_
    d = est.options.damping
    if isinstance(d, Mapping):
        return {k: float(d[k]) for k in train.names}
    if est.options.damping_rule(est.default_damping) is None:
        return {k: float(d) for k in train.names}
    sums = est.block_sq_sums()
    lam = {k: est.damping_for([k]) if sums[k] > 0 else 0.0 for k in train.names}
    if not any(v > 0 for v in lam.values()):
        raise est._zero_damping_error()
    return lam


class _LayerDamping:
    """Layer sampling damps each block with its own λ_l: the blocks are separate damping groups (so a dict
    ``damping`` is accepted there), and ``lambdas_`` reports the λ_l used, zero blocks' 0 included."""

    def block_groups(self) -> list[list[str]]:
        if self.options.sampling == "layer":
            return [[k] for k in self._check_fitted().names]
        return super().block_groups()

    @property
    def lambdas_(self) -> dict[str, float]:
        if self.options.sampling == "layer":
            return _layer_lambdas(self)
        return super().lambdas_


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
        _reject_blockwise(self.blockwise, "RRInf")
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
class RRInf(_LayerDamping, Estimator):
    """RRInf influence by normalised SGD (see module docstring). Global λ rule by default.

    Large training sets: each step couples all n training examples through one coordinate row φ_ι ∈ Rⁿ,
    so the rows are not split over ranks (``distributed=True`` is refused; under ``"auto"`` every rank
    computes the whole result). ``fit`` reads the training gradients once, row chunk by row chunk, and
    keeps the U distinct drawn coordinates of all n examples: U·n entries (U ≤ min(D, iters·batch_size)).
    On a GradientStore that is refused when U·n × (bytes per entry) exceeds ``memory_budget`` (lower
    ``iters``, raise ``memory_budget``, or use ``rrinf_fixed_point``, which streams). ``sampling="layer"``
    needs a whole (n, d_l) block per step and is refused on a store. Passes: ``fit`` 1; ``score``,
    ``topk`` 0 (the gathered rows are reused); ``self_influence`` 1. Memory: U·n + n·m (Ω) + output.
    """

    name = "rrinf"
    Options = RRInfOptions
    stochastic = True
    supports_distributed = False

    def _fit(self) -> None:
        o, train = self.options, self.train_
        if o.sampling == "layer" and self._train_store is not None:
            raise ValueError(
                "RRInf: sampling='layer' is not supported on a GradientStore (every step needs a whole (n, d_l) "
                "block); use sampling='neuron' or 'minibatch', or load the store into memory (store.load())"
            )
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
            lams = _layer_lambdas(self)
            self.layer_reg_, self.layer_inv_ = {}, {}
            for k in train.names:
                self.layer_reg_[k] = n * lams[k] / D
                nsq = torch.linalg.vector_norm(train[k].to(self.compute_dtype_), dim=0).square()  # row norms of Φ_l
                nz = nsq > 0
                self.layer_inv_[k] = torch.where(nz, 1.0 / torch.where(nz, nsq, torch.ones_like(nsq)), 0.0)
            return self
        b = o.batch_size if o.sampling == "minibatch" else 1
        if draws.numel() != o.iters * b or (draws.numel() and (draws.min() < 0 or draws.max() >= D)):
            raise ValueError(f"need {o.iters * b} coordinate indices in [0, {D})")
        self.coords_ = draws
        self.block_of_, self.col_of_ = self._locate(draws)
        self.step_batch_ = b
        self._gather_drawn_rows(draws)  # one pass (also sums the squares for the 'auto' λ)
        self.reg_ = n * self.damping_for(train.names) / D
        self._zero_row_steps(draws, b)
        return self

    def _gather_drawn_rows(self, draws: torch.Tensor) -> None:
        """Rows φ_ι (all n examples) of the distinct drawn coordinates, in one pass over the training rows:
        ``drawn_rows_`` (U, n) and ``drawn_pos_`` (the row of each draw in it)."""
        uniq, pos = torch.unique(draws, return_inverse=True)
        n, U = self.n_, int(uniq.numel())
        isz = torch.empty((), dtype=self.compute_dtype_).element_size()
        if self._train_store is not None and U * n * isz > self.options.memory_budget:
            raise ValueError(
                f"RRInf: the {U} distinct coordinates drawn (iters × batch_size = {draws.numel()}) across n = {n} "
                f"training examples need {U * n * isz / 2**30:.3g} GiB, more than memory_budget = "
                f"{self.options.memory_budget / 2**30:.3g} GiB; lower iters, raise memory_budget, or use "
                "rrinf_fixed_point (which streams)"
            )
        block, col = self._locate(uniq)
        rows = torch.empty(U, n, dtype=self.compute_dtype_, device=self.device_)
        sel = {}
        for bi, k in enumerate(self.train_.names):
            idx = torch.nonzero(block == bi).flatten()
            if idx.numel():
                sel[k] = (idx.to(self.device_), col[idx].to(self.device_))
        for s, e, ch in self._pass(self._chunk(U)):
            for k, (idx, c) in sel.items():
                rows[idx, s:e] = ch[k][:, c].T
        self.drawn_rows_, self.drawn_pos_ = rows, pos

    def _zero_row_steps(self, draws: torch.Tensor, b: int) -> None:
        """Per-step factors that keep the regulariser on steps that draw zero rows (METHODS.md §5).

        ``rrinf_row_updates`` averages the row term over the step's *non-zero* rows and skips a step
        whose rows are all zero, regulariser included. The step wanted here is
        Ω ← (1 − 2η·reg) Ω − η (c/b) Ā(Ω), Ā the average over the c non-zero rows of the b drawn. With
        Ω = s·Ω̃ it is the kernel's step on Ω̃ with learning rate η c/(b f), targets Υ/s and
        s ← s·f, f = 1 − 2η·reg·(1 − c/b) (f = 1 when no row of the step is zero). Sets
        ``step_factor_`` (f, float64) and ``step_lr_`` (the kernel's learning rates), or None for both
        when no drawn row is zero (then the kernel runs unchanged).
        """
        nz = (torch.linalg.vector_norm(self.drawn_rows_, dim=1) > 0).cpu()[self.drawn_pos_]  # per draw
        c = nz.reshape(-1, b).sum(1).double()  # non-zero rows per step
        if bool((c == b).all()):
            self.step_factor_ = self.step_lr_ = None
            return
        f = 1.0 - 2.0 * self.lrs_ * self.reg_ * (1.0 - c / b)
        if not bool((f > 0).all()):
            raise ValueError(
                "RRInf: lr × damping too large: 2·lr·nλ/D ≥ 1 on a step that draws zero rows "
                "(the regulariser alone overshoots); lower lr or damping"
            )
        self.step_factor_ = f
        self.step_lr_ = torch.where(c > 0, self.lrs_ * c / (b * f), self.lrs_)

    def _segments(self, steps_per_seg: int) -> list[tuple[int, int]]:
        """Step ranges processed per kernel call; with zero-row factors a range also ends before the
        running scale s would drop below e⁻²⁰ (so Υ/s stays far from overflow)."""
        iters = self.options.iters
        if self.step_factor_ is None:
            return [(s0, min(s0 + steps_per_seg, iters)) for s0 in range(0, iters, steps_per_seg)]
        neg_cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(-torch.log(self.step_factor_), 0)])
        out, s0 = [], 0
        while s0 < iters:
            last = int(torch.searchsorted(neg_cum, neg_cum[s0] + 20.0, right=True)) - 1  # last t: s_t ≥ e⁻²⁰
            s1 = min(s0 + steps_per_seg, iters, last + 1)
            out.append((s0, s1))
            s0 = s1
        return out

    _SEGMENT_ROWS = 1 << 22  # drawn rows gathered at once: segment × n ≤ 4M entries

    def _gather(self, gs: GradientSet | None, lo: int, hi: int) -> torch.Tensor:
        """The drawn coordinates lo..hi of ``gs`` as rows: (hi − lo, gs.n); ``gs=None``: of the training set
        (φ_ι, from the rows gathered at fit)."""
        if gs is None:
            return self.drawn_rows_[self.drawn_pos_[lo:hi].to(self.device_)]
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

    def omega(self, test: GradientSet | torch.Tensor) -> torch.Tensor:
        """Ω (n, m) after all ``iters`` steps for the tests in ``test``: column j is ω for test j, the
        iterate of the ridge problem with Υ = −n T (see the module docstring). ``score(test) = omega(test).T``.
        """
        return self._omega(self._prep_test(test))

    def preconditioned_test(self, test: GradientSet | torch.Tensor) -> dict[str, torch.Tensor]:
        """Not defined for RRInf: its iterate is not a fixed preconditioner applied to t. Use :meth:`omega`."""
        raise NotImplementedError("RRInf has no preconditioned test vectors; use omega(test) (n, m) or score(test)")

    def _omega(self, test: GradientSet) -> torch.Tensor:
        """Ω (n, m) after all steps, for the (prepared) tests in ``test``."""
        o, train = self.options, self.train_
        m = test.n
        omega = torch.zeros(self.n_, m, dtype=self.compute_dtype_, device=self.device_)
        lrs = self.lrs_.to(device=self.device_, dtype=self.compute_dtype_)
        if o.sampling != "layer":
            # stream over segments of steps so that memory stays O(segment · n), whatever `iters` is
            b = self.step_batch_
            steps_per_seg = max(1, self._SEGMENT_ROWS // (b * max(self.n_ + m, 1)))
            for s0, s1 in self._segments(steps_per_seg):
                rows = self._gather(None, s0 * b, s1 * b)
                targets = self._gather(test, s0 * b, s1 * b).mul_(-self.n_)  # Υ = −n T
                if self.step_factor_ is None:
                    omega = rrinf_row_updates(rows, targets, omega, lrs[s0:s1], self.reg_, b, backend=o.backend)
                    continue
                # zero rows drawn: run the kernel on Ω̃ = Ω/s (see _zero_row_steps)
                f = self.step_factor_[s0:s1]
                s_t = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(f, 0)[:-1]])  # s before step t
                targets.div_(s_t.repeat_interleave(b)[:, None].to(device=targets.device, dtype=targets.dtype))
                step_lr = self.step_lr_[s0:s1].to(device=self.device_, dtype=self.compute_dtype_)
                omega = rrinf_row_updates(rows, targets, omega, step_lr, self.reg_, b, backend=o.backend)
                omega.mul_(float(torch.prod(f)))
            return omega
        for t, bi in enumerate(self.layer_draws_):
            k = train.names[bi]
            X = train[k].to(self.compute_dtype_)  # (n, d_l); Φ_l = Xᵀ (in memory: layer mode refuses stores)
            E = X.T @ omega + self.n_ * test[k].T  # Φ_l Ω − Υ_l, (d_l, m)
            upd = (X @ (E * self.layer_inv_[k][:, None])).mul_(2.0 / X.shape[1])  # zero rows: inv = 0
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

    def self_influence(self, *, gather: bool = False) -> torch.Tensor:
        """Ω_ii with each training gradient as its own test (tests processed in chunks, one pass)."""
        train = self._check_fitted()
        out = []
        step = min(self._test_chunks(train.n), self._chunk(1))  # tests = training rows read: both bounds
        for s, e, ch in self._pass(step):
            om = self._omega(ch)  # (n, c)
            out.append(om[torch.arange(s, e, device=om.device), torch.arange(e - s, device=om.device)])
        return torch.cat(out)


@dataclass
class RRInfFixedPointOptions(EstimatorOptions):
    sampling: str = field(default="neuron", metadata={"help": "which RRInf iteration's fixed point"})
    solve: str = field(default="auto", metadata={"help": "'auto' | 'n' | 'd' (as Exact)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        _reject_blockwise(self.blockwise, "RRInfFixedPoint")
        if self.sampling not in _SAMPLING:
            raise ValueError(f"sampling must be one of {_SAMPLING}, got {self.sampling!r}")
        if self.solve not in ("auto", "n", "d"):
            raise ValueError(f"solve must be 'auto', 'n' or 'd', got {self.solve!r}")


@register
class RRInfFixedPoint(_LayerDamping, Estimator):
    """Closed form of the weighted ridge problem RRInf's normalised SGD targets (METHODS.md §5).

    With sampling weights a_ι (1/D for neuron/minibatch sampling, 1/(L·d_l) for layer sampling) and
    row norms ‖φ_ι‖², the expected step vanishes at

        ω_W = (Σ_ι a_ι φ_ι φ_ιᵀ / ‖φ_ι‖² + λ̄ I)⁻¹ Σ_ι a_ι υ_ι φ_ι / ‖φ_ι‖²,

    with λ̄ = nλ/D (neuron) or mean_l nλ_l/D (layer). For neuron sampling this is
    (ΦᵀWΦ + nλI)⁻¹ΦᵀWυ, W = diag(1/‖φ_ι‖²). It is computed as ``Exact`` on coordinate-rescaled
    gradients g̃_ι = g_ι·√(D a_ι)/‖φ_ι‖ with λ' = D λ̄ / n. Float64 by default.

    Zero rows get W = 0 but keep their sampling weight in the regulariser: the sum runs over all D
    coordinates (a_ι = 1/D, or 1/(L·d_l) in layer mode, zero rows included). This is the problem
    :class:`RRInf` iterates on (its zero-row steps apply the regulariser, METHODS.md §5) and what the
    reference's update does on every drawn row; an all-zero block in layer mode has λ_l = 0 under
    ``damping="auto"``.

    Large training sets: as :class:`Exact` on the rescaled gradients (streamed, distributed in d-space),
    after one more pass for the coordinate norms ‖φ_ι‖² (all-reduced). Passes: ``fit`` 1 + Exact's fit (1 in
    d-space); ``score`` / ``topk`` / ``self_influence`` as Exact. Memory: as Exact, plus D.
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
        col = self.column_sq_sums()  # one pass: ‖φ_ι‖² of every coordinate, and the 'auto' λ
        for k in train.names:
            nsq = col[k].to(self.compute_dtype_)
            a = (1.0 / D) if o.sampling != "layer" else 1.0 / (L * train.dims[k])
            nz = nsq > 0
            self.coord_scale_[k] = torch.where(nz, torch.sqrt(D * a / torch.where(nz, nsq, torch.ones_like(nsq))), 0.0)
        if o.sampling == "layer":
            lam_bar = sum(n * lam / D for lam in _layer_lambdas(self).values()) / L
        else:
            lam_bar = n * self.damping_for(train.names) / D
        self.lambda_eff_ = D * lam_bar / n
        # Exact on the coordinate-rescaled gradients, read from the same training rows (scaled chunk by chunk)
        self.exact_ = Exact(
            damping=self.lambda_eff_,
            blockwise=False,
            solve=o.solve,
            dtype=self.compute_dtype_,
            device=o.device,
            backend=o.backend,
            chunk_size=o.chunk_size,
            memory_budget=o.memory_budget,
            distributed=self.distributed_,
        )
        self.exact_._shared_stats = self._stats
        self.exact_._row_scale = self.coord_scale_
        self.exact_.fit(self._train_store if self._train_store is not None else train)

    def _test_side(self, test: GradientSet) -> dict[str, torch.Tensor]:
        scaled = GradientSet({k: test[k] * self.coord_scale_[k] for k in test.names}, validate=False)
        return self.exact_._test_side(scaled)

    def preconditioned_test(self, test: GradientSet | torch.Tensor) -> dict[str, torch.Tensor]:
        """h_l(t) with ``score(test) = −Σ_l h_l Φ_lᵀ`` against the raw training gradients: name -> (m, d_l).

        With S = diag(√(D a_ι)/‖φ_ι‖) the coordinate scaling and G̃ = S G S: h(t) = S (G̃ + λ'I)⁻¹ S t.
        """
        test = self._prep_test(test)
        return {k: v * self.coord_scale_[k] for k, v in self._test_side(test).items()}

    def _train_side(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x * self.coord_scale_[name]

    def self_influence(self, *, gather: bool = False) -> torch.Tensor:
        """−g̃_iᵀ(G̃ + λ'I)⁻¹g̃_i on the coordinate-rescaled gradients (see the class docstring)."""
        self._check_fitted()
        return self.exact_.self_influence(gather=gather)
