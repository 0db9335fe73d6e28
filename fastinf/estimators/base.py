"""Common machinery of the estimators: registry and method facts, options, damping, scoring, top-k.

Every estimator derives from :class:`BaseEstimator`, which holds the facts the registry reports
(``input_kind``, ``uses_damping``, ``stochastic``: see :func:`method_info`), option validation and
``__repr__``, and fixes the public protocol: ``fit(train)``, ``score(test, reduce=None|"mean"|"sum")``,
``topk(test, k)``, ``self_influence()``. Two bases implement it:

* :class:`Estimator` — gradient-based methods (METHODS.md §1–6), input ``GradientSet``. Each is
  *linear* in the test gradient,

      I(i, j) = − Σ_l ⟨ a_l(t_j), b_l(g_i) ⟩,

  with a "test side" a_l (a preconditioner applied to the test vectors, e.g. DataInf's h_l or LiSSA's
  recursion) and a "train side" b_l (the training gradients, or training gradients preconditioned at
  fit time). ``score`` and ``topk`` are built on those two sides: ``topk`` walks over chunks of
  training examples and never forms the (m, n) matrix.
* :class:`TraceEstimator` — zeroth-order methods on loss traces (METHODS.md §7–8), input ``LossTrace``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..gradients.gradient_set import GradientSet, align_test
from ..gradients.store import GradientStore, check_same_model
from ..traces.loss_trace import LossTrace

log = logging.getLogger("fastinf")

__all__ = [
    "INPUT_KINDS",
    "BaseEstimator",
    "Estimator",
    "EstimatorOptions",
    "MethodInfo",
    "TraceEstimator",
    "available_methods",
    "get_estimator",
    "influence",
    "method_info",
    "register",
]

INPUT_KINDS = ("gradients", "traces")

_REGISTRY: dict[str, type[BaseEstimator]] = {}


def register(cls: type[BaseEstimator]) -> type[BaseEstimator]:
    """Class decorator: make an estimator reachable by its canonical ``name``.

    Checks that the class states its facts: a non-empty ``name``, ``input_kind`` in
    :data:`INPUT_KINDS`, boolean ``uses_damping`` / ``stochastic``, and a dataclass ``Options``.
    """
    if not cls.name:
        raise TypeError(f"{cls.__name__}: an estimator needs a non-empty class attribute 'name'")
    if cls.input_kind not in INPUT_KINDS:
        raise TypeError(f"{cls.__name__}: input_kind must be one of {INPUT_KINDS}, got {cls.input_kind!r}")
    if not isinstance(cls.uses_damping, bool) or not isinstance(cls.stochastic, bool):
        raise TypeError(f"{cls.__name__}: uses_damping and stochastic must be bools")
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"{cls.__name__}: Options must be a dataclass")
    _REGISTRY[cls.name] = cls
    return cls


_CANONICAL_ORDER = [
    "hessian_free",
    "diagonal_fisher",
    "datainf",
    "lissa",
    "rrinf",
    "rrinf_fixed_point",
    "exact",
    "z0inf",
    "bif",
]


@dataclass(frozen=True)
class MethodInfo:
    """What the registry knows about one method (the class's own facts; see :func:`method_info`)."""

    name: str  # canonical name, as in influence(method=...) and the CLI
    cls: type  # the estimator class
    input_kind: str  # "gradients" (GradientSet) or "traces" (LossTrace)
    uses_damping: bool  # whether the scores depend on the damping λ (the `damping` option)
    stochastic: bool  # whether the scores depend on the `seed` option (report seed variance)
    options: tuple[str, ...]  # names of the constructor options (the Options dataclass fields)


def _key(method: str) -> str:
    if not isinstance(method, str):
        raise TypeError(f"method must be a str, got {type(method).__name__}")
    return method.strip().lower().replace("-", "_")


def available_methods(input_kind: str | None = None) -> list[str]:
    """Canonical names of the implemented methods (usable in :func:`influence` and the CLI), in the
    canonical order. ``input_kind="gradients"`` or ``"traces"`` keeps only the methods of that input."""
    if input_kind is not None and input_kind not in INPUT_KINDS:
        raise ValueError(f"input_kind must be None, 'gradients' or 'traces', got {input_kind!r}")
    rank = {k: i for i, k in enumerate(_CANONICAL_ORDER)}
    names = sorted(_REGISTRY, key=lambda k: (rank.get(k, len(rank)), k))
    return [k for k in names if input_kind is None or _REGISTRY[k].input_kind == input_kind]


def method_info(name: str) -> MethodInfo:
    """The registry's facts about a method (``"datainf"``, ``"rrinf"``, ``"z0inf"``, ...)."""
    key = _key(name)
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {available_methods()}")
    return _REGISTRY[key].info()


def get_estimator(method: str, **options: Any) -> BaseEstimator:
    """An estimator instance by canonical name (``"datainf"``, ``"exact"``, ...)."""
    key = _key(method)
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {method!r}; available: {available_methods()}")
    return _REGISTRY[key](**options)


def influence(
    train: GradientSet, test: GradientSet, method: str = "datainf", reduce: str | None = None, **options: Any
) -> torch.Tensor:
    """One-call influence: ``get_estimator(method, **options).fit(train).score(test, reduce=reduce)``.

    Returns (m, n) scores, or (n,) with ``reduce="mean"``; positive = harmful (METHODS.md §0).
    """
    return get_estimator(method, **options).fit(train).score(test, reduce=reduce)


def merge_topk(vals, idx, scores: torch.Tensor, offset: int, k: int, largest: bool):
    """Merge the top-k of a chunk of columns (starting at column ``offset``) into running (vals, idx)."""
    v, i = torch.topk(scores, min(k, scores.shape[1]), dim=1, largest=largest)
    i = i + offset
    if vals is None:
        return v, i
    vals, sel = torch.topk(torch.cat([vals, v], 1), min(k, vals.shape[1] + v.shape[1]), 1, largest=largest)
    return vals, torch.gather(torch.cat([idx, i], 1), 1, sel)


def _as_dtype(x: Any, fieldname: str) -> torch.dtype | None:
    if x is None:
        return None
    if isinstance(x, str):
        x = getattr(torch, x.replace("torch.", ""), None)
    if not isinstance(x, torch.dtype) or not x.is_floating_point:
        raise ValueError(f"{fieldname} must be a floating torch dtype (e.g. torch.float64 or 'float32'), got {x!r}")
    return x


@dataclass
class EstimatorOptions:
    """Options shared by the gradient-based estimators.

    ``damping`` follows one rule for every gradient method: ``"auto"`` or a positive finite float
    (λ = 0 would divide by zero in every method that uses it). Methods that do not use damping
    (``hessian_free``; see ``method_info(name).uses_damping``) validate it by the same rule and then
    ignore it, so that one set of options can be passed to every method.

    Raises:
        ValueError: an invalid option, naming it (the estimator's constructor prefixes its class
            name: "DataInf: damping must be 'auto' or a positive finite float, got 0").
    """

    damping: float | str = field(
        default="auto",
        metadata={
            "help": "'auto' = damping_factor × mean squared gradient entry (METHODS.md §0), or an absolute λ > 0; "
            "validated but ignored by methods that do not use damping (hessian_free)"
        },
    )
    damping_factor: float = field(default=0.1, metadata={"help": "coefficient of the 'auto' rule (0.1 in both papers)"})
    blockwise: bool = field(default=False, metadata={"help": "per-block (True) or global (False) preconditioner"})
    dtype: Any = field(default=None, metadata={"help": "compute dtype; default: input dtype promoted to float32"})
    device: Any = field(default=None, metadata={"help": "compute device; default: the training gradients' device"})
    backend: str = field(default="auto", metadata={"help": "'auto' | 'cuda' | 'triton' | 'torch' for fastinf.ops"})
    chunk_size: int | None = field(
        default=None, metadata={"help": "training examples per chunk in topk/self_influence (None: automatic)"}
    )
    allow_mismatch: bool = field(
        default=False,
        metadata={
            "help": "score/topk a test GradientStore whose manifest records another model or adapter than the "
            "training store's (default: refuse with a StoreError; see fastinf.gradients.store.check_same_model)"
        },
    )

    def __post_init__(self) -> None:
        if self.damping != "auto":
            d = self.damping
            ok = not isinstance(d, (bool, str)) and isinstance(d, (int, float)) and math.isfinite(d) and d > 0
            if not ok:
                raise ValueError(f"damping must be 'auto' or a positive finite float, got {d!r}")
            self.damping = float(d)
        if not (isinstance(self.damping_factor, (int, float)) and self.damping_factor > 0):
            raise ValueError(f"damping_factor must be > 0, got {self.damping_factor!r}")
        self.dtype = _as_dtype(self.dtype, "dtype")
        if self.device is not None:
            self.device = torch.device(self.device)
        if self.backend not in ("auto", "cuda", "triton", "torch"):
            raise ValueError(f"backend must be 'auto', 'cuda', 'triton' or 'torch', got {self.backend!r}")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {self.chunk_size!r}")
        if not isinstance(self.allow_mismatch, bool):
            raise ValueError(f"allow_mismatch must be a bool, got {self.allow_mismatch!r}")


_REDUCE = (None, "mean", "sum")


def _check_reduce(reduce: Any) -> None:
    if reduce not in _REDUCE:
        raise ValueError(f"reduce must be None, 'mean' or 'sum', got {reduce!r}")


def _reduce(scores: torch.Tensor, reduce: str | None) -> torch.Tensor:
    """(m, n) scores -> as is (None), mean over tests ("mean", (n,)) or sum over tests ("sum", (n,))."""
    _check_reduce(reduce)
    if reduce is None:
        return scores
    return scores.mean(0) if reduce == "mean" else scores.sum(0)


class BaseEstimator:
    """Root of every estimator: the registry facts, option handling and the public protocol.

    Class facts (read by :func:`method_info` and :func:`available_methods`):

    * ``name`` — canonical method name;
    * ``input_kind`` — ``"gradients"`` (fit/score take a ``GradientSet`` or an (n, D) tensor) or
      ``"traces"`` (a ``LossTrace`` or a (T, n) tensor of losses);
    * ``uses_damping`` — whether the scores depend on the damping λ;
    * ``stochastic`` — whether the scores depend on the ``seed`` option;
    * ``Options`` — the validated options dataclass (constructor keywords are its fields).

    Protocol: ``fit(train) -> self``; ``score(test, *, reduce=None)`` → (m, n), or (n,) for
    ``reduce="mean"`` / ``"sum"``; ``topk(test, k, *, largest=True)`` → (values (m, k), indices (m, k));
    ``self_influence()`` → (n,). Positive = harmful for every method (METHODS.md §0).
    """

    name: ClassVar[str] = ""
    input_kind: ClassVar[str] = ""
    uses_damping: ClassVar[bool] = False
    stochastic: ClassVar[bool] = False
    Options: ClassVar[type] = object

    def __init__(self, **options: Any) -> None:
        """Validate the options (the ``Options`` dataclass's fields).

        Raises:
            TypeError: an unknown option.
            ValueError: an invalid option value: "<Class>: <option> must be ..., got ...".
        """
        valid = {f.name for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown option(s) {unknown}; valid options: {sorted(valid)}")
        try:
            self.options = self.Options(**options)
        except ValueError as e:
            raise ValueError(f"{type(self).__name__}: {e}") from None
        self.train_: Any = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"

    @classmethod
    def info(cls) -> MethodInfo:
        """The class's registry facts as a :class:`MethodInfo`."""
        return MethodInfo(
            name=cls.name,
            cls=cls,
            input_kind=cls.input_kind,
            uses_damping=cls.uses_damping,
            stochastic=cls.stochastic,
            options=tuple(f.name for f in dataclasses.fields(cls.Options)),
        )

    def _check_fitted(self) -> Any:
        if self.train_ is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call .fit(train) first")
        return self.train_

    @staticmethod
    def _check_k(k: Any, n: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ValueError(f"k must be an int in [1, n={n}], got {k!r}")

    def fit(self, train: Any) -> BaseEstimator:  # pragma: no cover - overridden
        raise NotImplementedError

    def score(self, test: Any, *, reduce: str | None = None) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def topk(self, test: Any, k: int, *, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def self_influence(self) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError


class Estimator(BaseEstimator):
    """Base of the gradient-based estimators. Subclasses set ``name``, ``Options`` and the facts, and
    implement ``_fit`` and the two sides."""

    input_kind: ClassVar[str] = "gradients"
    uses_damping: ClassVar[bool] = True
    Options: ClassVar[type[EstimatorOptions]] = EstimatorOptions
    # False: the 'auto' rule may give λ = 0 without an error (a method that does not divide by λ)
    requires_positive_damping: ClassVar[bool] = True
    default_dtype: ClassVar[torch.dtype | None] = None  # None: input promoted to float32
    # False: keep the training gradients in their own dtype (≥ float32) and cast one block at a time
    # to the compute dtype (Exact's float64 solve would otherwise double the memory of the whole set)
    cast_storage: ClassVar[bool] = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.train_: GradientSet | None = None
        self._train_store: GradientStore | None = None

    # ------------------------------------------------------------------------- fitting
    def fit(self, train: GradientSet | torch.Tensor) -> Estimator:
        """Fit on the training gradients (a GradientSet, a GradientStore, or an (n, D) tensor). Returns ``self``.

        Raises:
            TypeError: not gradients, or a non-floating dtype.
            ValueError: ``damping="auto"`` on training gradients that are all zero where the method
                needs λ > 0: one message naming the zero blocks (all of them, or their count and the
                first few); method-specific problems.
        """
        train = self._coerce(train, "train")
        self._train_store = train if isinstance(train, GradientStore) else None
        self.compute_dtype_ = self._compute_dtype(train)
        storage = self.compute_dtype_ if self.cast_storage else torch.promote_types(train.dtype, torch.float32)
        self.train_ = train.to(device=self.options.device, dtype=storage)
        self.n_ = self.train_.n
        self._fit()
        return self

    def _zero_damping_error(self) -> ValueError:
        """The error of ``damping="auto"`` on all-zero training gradients: every zero block, or their
        count and the first three when there are more than five."""
        train = self._check_fitted()
        zero = [k for k in train.names if not bool(train[k].any())]
        if not zero:  # not exactly zero: the mean square underflowed in the compute dtype
            return ValueError(
                f"{type(self).__name__}: damping='auto' gives λ = 0 because the training gradients' mean square "
                f"underflows to 0 in {self.compute_dtype_}; pass an explicit damping (a positive float) or "
                "dtype=torch.float64"
            )
        shown = ", ".join(repr(k) for k in zero[: 5 if len(zero) <= 5 else 3])
        listing = f"({shown})" if len(zero) <= 5 else f"(e.g. {shown})"
        return ValueError(
            f"{type(self).__name__}: damping='auto' gives λ = 0 because the training gradients of "
            f"{len(zero)} of {len(train.names)} blocks {listing} are all zero; pass an explicit damping "
            "(a positive float)"
        )

    def _fit(self) -> None:  # pragma: no cover - overridden
        pass

    @staticmethod
    def _coerce(gs: Any, what: str) -> GradientSet:
        if isinstance(gs, torch.Tensor):
            if not gs.is_floating_point():
                raise TypeError(f"{what} gradients must have a floating dtype, got {gs.dtype}")
            return GradientSet.from_matrix(gs)
        if not isinstance(gs, GradientSet):
            raise TypeError(f"{what} must be a GradientSet or an (n, D) tensor, got {type(gs).__name__}")
        return gs

    def _compute_dtype(self, train: GradientSet) -> torch.dtype:
        if self.options.dtype is not None:
            return self.options.dtype
        if self.default_dtype is not None:
            return self.default_dtype
        return torch.promote_types(train.dtype, torch.float32)

    def _prep_test(self, test: GradientSet | torch.Tensor) -> GradientSet:
        train = self._check_fitted()
        test = self._coerce(test, "test")
        if self._train_store is not None and isinstance(test, GradientStore) and not self.options.allow_mismatch:
            check_same_model(self._train_store, test)
        if isinstance(test, GradientSet) and test.names == ["all"] and train.names != ["all"]:
            if test.dim != train.dim:
                raise ValueError(f"test has width {test.dim} but the training gradients have D = {train.dim}")
            m = test["all"]
            off, blocks = 0, {}
            for k, d in train.dims.items():
                blocks[k] = m[:, off : off + d]
                off += d
            test = GradientSet(blocks, validate=False)
        test = align_test(train, test)
        return test.to(device=train.device, dtype=self.compute_dtype_)

    # ------------------------------------------------------------------------- damping
    def block_groups(self) -> list[list[str]]:
        """Blocks preconditioned together: one group per block (blockwise) or one group of all."""
        names = self._check_fitted().names
        return [[k] for k in names] if self.options.blockwise else [names]

    def damping_for(self, group: list[str]) -> float:
        """Absolute λ of a block group: the explicit float, or factor × mean squared entry."""
        if not isinstance(self.options.damping, str):
            return self.options.damping
        train = self._check_fitted()
        # row norms (no n×d temporary), summed in float64
        tot = sum(float(torch.linalg.vector_norm(train[k], dim=1).double().square().sum()) for k in group)
        width = sum(train.dims[k] for k in group)
        lam = self.options.damping_factor * tot / (train.n * width)
        if not lam > 0 and self.requires_positive_damping:
            raise self._zero_damping_error()
        return lam

    @property
    def lambdas_(self) -> dict[str, float]:
        """λ used for each block (blocks of one group share it)."""
        return {k: self.damping_for(g) for g in self.block_groups() for k in g}

    # ------------------------------------------------------------------------- the two sides
    def _test_side(self, test: GradientSet) -> dict[str, torch.Tensor]:
        """Preconditioned test vectors a_l(t): name -> (m, d_l). Default: identity."""
        return {k: test[k] for k in test.names}

    def _train_side(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Train side b_l(g_i) for examples start..stop: (c, d_l). Default: the gradients."""
        return self.train_[name][start:stop].to(self.compute_dtype_)

    def _blk(self, name: str) -> torch.Tensor:
        """A training block in the compute dtype (a copy only when the storage dtype differs)."""
        return self.train_[name].to(self.compute_dtype_)

    def _score_cols(self, tside: dict[str, torch.Tensor], start: int, stop: int) -> torch.Tensor:
        out = None
        for k, a in tside.items():
            b = self._train_side(k, start, stop)
            out = a @ b.T if out is None else out.addmm_(a, b.T)
        return out.neg_()

    def _chunk(self, m: int) -> int:
        if self.options.chunk_size is not None:
            return self.options.chunk_size
        return max(256, min(self.n_, (1 << 24) // max(m, 1)))

    # ------------------------------------------------------------------------- public API
    def preconditioned_test(self, test: GradientSet | torch.Tensor) -> dict[str, torch.Tensor]:
        """Preconditioned test vectors h_l(t_j), per block: name -> (m, d_l) in the compute dtype.

        They are defined by ``score(test) = −Σ_l h_l Φ_lᵀ`` with Φ_l (n, d_l) the training gradients of
        block l, i.e. h(t) = P t for the method's preconditioner P: t (Hessian-free; t/n with
        ``normalize=True``), t/(diag G + λ) (diagonal Fisher), DataInf's h_l(t) (METHODS.md §3),
        LiSSA's r_K/s (§4), (G + λI)⁻¹ t (Exact, §1), the weighted-ridge preconditioner (RRInfFixedPoint).
        These are the reference engines' ``hvp_dict`` entries.
        """
        return self._test_side(self._prep_test(test))

    def score(self, test: GradientSet | torch.Tensor, *, reduce: str | None = None) -> torch.Tensor:
        """Influence of every training example on every test example.

        Returns (m, n) with row j = test example j, column i = training example i, or (n,) for
        ``reduce="mean"`` (influence on the mean test loss) / ``"sum"``. Positive = harmful.

        Raises:
            StoreError: fitted on a GradientStore and given a test GradientStore captured from another
                model or adapter (unless ``allow_mismatch=True``; see
                :func:`fastinf.gradients.store.check_same_model`).
            ValueError: test blocks that do not match the training blocks; a bad ``reduce``.
        """
        test = self._prep_test(test)
        _check_reduce(reduce)
        if reduce is not None:
            m = test.n
            test = test.mean()
            s = self._score(test)[0]
            return s * m if reduce == "sum" else s
        return self._score(test)

    def _score(self, test: GradientSet) -> torch.Tensor:
        tside = self._test_side(test)
        return self._score_cols(tside, 0, self.n_)

    def topk(
        self, test: GradientSet | torch.Tensor, k: int, *, largest: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The k largest (or smallest) scores per test example, without forming the (m, n) matrix.

        Returns ``(values (m, k), indices (m, k))`` sorted like ``torch.topk``.

        Raises:
            StoreError: train and test stores of different models or adapters, as in :meth:`score`.
            ValueError: ``k`` not in [1, n]; test blocks that do not match the training blocks.
        """
        test = self._prep_test(test)
        self._check_k(k, self.n_)
        return self._topk(test, k, largest)

    def _topk(self, test: GradientSet, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
        tside = self._test_side(test)
        chunk = self._chunk(test.n)
        vals = idx = None
        for s in range(0, self.n_, chunk):
            e = min(s + chunk, self.n_)
            sc = self._score_cols(tside, s, e)
            vals, idx = merge_topk(vals, idx, sc, s, k, largest)
        return vals, idx

    def self_influence(self) -> torch.Tensor:
        """I(i, i) with t = g_i for every training example: (n,). Positive = harmful."""
        train = self._check_fitted()
        chunk = self._chunk(train.n)
        out = []
        for s in range(0, train.n, chunk):
            e = min(s + chunk, train.n)
            tside = self._test_side(train.subset(slice(s, e)))
            acc = None
            for k, a in tside.items():
                v = (a * self._train_side(k, s, e)).sum(1)
                acc = v if acc is None else acc + v
            out.append(-acc)
        return torch.cat(out)


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
