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
  training examples and never forms the (m, n) matrix. Every pass over the training gradients reads
  row chunks (``iter_chunks``), from memory or from a :class:`GradientStore` alike, counts itself in
  ``passes_``, and under torch.distributed covers only this rank's rows (see :class:`Estimator`). A store
  that recorded its per-block sums of squares spares the pass ``damping="auto"`` would otherwise take.
* :class:`~.trace_base.TraceEstimator` — zeroth-order methods on loss traces (METHODS.md §7–8), input ``LossTrace``.

Layout: the registry and method facts live in :mod:`.registry`, the shared options in :mod:`.options`,
:class:`TraceEstimator` in :mod:`.trace_base`; this module keeps :class:`BaseEstimator` and the gradient
estimators' row-chunk pass machinery (chunk reads, conversion buffers, pass counting, the rank split,
all-reduced statistics, merged top-k, gathered columns). The registry names are re-exported here.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from typing import Any, ClassVar

import torch

from ..distributed import all_gather_objects, all_reduce_sum, gather_cat, is_distributed, rank, split_range, world_size
from ..gradients.gradient_set import GradientSet, align_test
from ..gradients.store import GradientStore, check_same_model
from .damping import check_dict_damping, estimator_lambda
from .options import EstimatorOptions
from .registry import INPUT_KINDS, MethodInfo, available_methods, get_estimator, influence, method_info, register

log = logging.getLogger("fastinf")

__all__ = [
    "INPUT_KINDS",
    "BaseEstimator",
    "Estimator",
    "EstimatorOptions",
    "MethodInfo",
    "available_methods",
    "get_estimator",
    "influence",
    "method_info",
    "register",
]


def merge_topk(vals, idx, scores: torch.Tensor, offset: int, k: int, largest: bool):
    """Merge the top-k of a chunk of columns (starting at column ``offset``) into running (vals, idx)."""
    v, i = torch.topk(scores, min(k, scores.shape[1]), dim=1, largest=largest)
    i = i + offset
    if vals is None:
        return v, i
    vals, sel = torch.topk(torch.cat([vals, v], 1), min(k, vals.shape[1] + v.shape[1]), 1, largest=largest)
    return vals, torch.gather(torch.cat([idx, i], 1), 1, sel)


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


def _iter_rows(gs: Any, size: int, start: int, stop: int):
    """Rows ``[start, stop)`` of a GradientSet or GradientStore in chunks of ``size`` rows: yields
    ``(offset, GradientSet)``. Uses ``iter_chunks(size, start=, stop=)`` where the object has it, else
    slices (in memory) or reads the row range (``_rows``, an older GradientStore)."""
    it = getattr(gs, "iter_chunks", None)
    if it is not None:
        try:
            accepts = "start" in inspect.signature(it).parameters
        except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
            accepts = False
        if accepts:
            if stop > start:
                yield from it(size, start=start, stop=stop)
            return
    read = getattr(gs, "_rows", None)
    for s in range(start, stop, size):
        e = min(s + size, stop)
        yield s, (read(s, e) if read is not None else gs.subset(slice(s, e)))


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
    implement ``_fit`` and the two sides.

    **Streaming.** Every pass over the training gradients — fit statistics, ``score`` (``reduce=None``,
    ``"mean"``, ``"sum"``), ``topk``, ``self_influence`` — walks row chunks of ``chunk_size`` examples
    (default: from ``memory_budget``) through ``iter_chunks``; on a :class:`GradientStore` no whole
    ``(n, d_l)`` block is ever read, and each chunk is converted to the compute dtype (float32 or higher,
    whatever the storage dtype) as it arrives. An in-memory GradientSet takes the same path (its chunks
    are views). Peak memory is O(chunk·D + m·D + output) plus each method's own statistics, stated in its
    class docstring.

    **Passes.** ``passes_`` counts the passes over the training gradients since the last ``fit`` (``fit``
    resets it to 0; every later ``score`` / ``topk`` / ``self_influence`` adds its own), and
    ``rows_read_`` the training rows this process read. The first pass after ``fit`` also sums the
    squared gradient entries per block (what ``damping="auto"`` needs), so a method whose fit already
    reads the data gets λ for free; one that needs λ *before* its first pass (DataInf) spends a pass on it
    — except on a :class:`GradientStore` that recorded those sums when it was written
    (:meth:`GradientStore.block_sq_sums`: exact float64 sums of the stored rows, global, so any rank split
    uses them): ``fit`` then takes them from the manifest and no pass is spent on λ. Stores written before
    the sums were recorded, and in-memory GradientSets, sum them in the first pass.

    **Distributed.** With ``distributed="auto"`` (default: when a torch.distributed process group of more
    than one process is initialised) or ``True``, rank r owns the training rows ``rows_ = (start, stop)``
    of :func:`fastinf.distributed.split_range` and reads only those; fit statistics are all-reduced, so
    every rank holds the same preconditioner. Then:

    * ``topk(test, k)`` is merged across ranks: every rank returns the same global (values, indices);
    * ``score(test, reduce=..., gather=False)`` returns this rank's columns ``rows_[0]:rows_[1]``
      ((m, stop − start), or (stop − start,) with ``reduce``); ``gather=True`` returns the full (m, n) /
      (n,) on every rank (all-gather);
    * ``self_influence(gather=False)`` likewise: this rank's rows, or all n with ``gather=True``.

    Without a process group (or ``distributed=False``) ``rows_ = (0, n)`` and ``gather`` changes nothing.
    """

    input_kind: ClassVar[str] = "gradients"
    uses_damping: ClassVar[bool] = True
    Options: ClassVar[type[EstimatorOptions]] = EstimatorOptions
    # False: the 'auto' rule may give λ = 0 without an error (a method that does not divide by λ)
    requires_positive_damping: ClassVar[bool] = True
    default_dtype: ClassVar[torch.dtype | None] = None  # None: input promoted to float32
    # the rule damping="auto" resolves to (METHODS.md §0, §10): (rule, options) of .damping.check_rule
    default_damping: ClassVar[tuple[str, dict[str, float]]] = ("paper", {})
    # False: keep in-memory training gradients in their own dtype (≥ float32) and cast one row chunk at a
    # time to the compute dtype (Exact's float64 solve would otherwise double the memory of the whole set)
    cast_storage: ClassVar[bool] = True
    # False: the method cannot split the training rows over ranks (distributed=True is refused and 'auto'
    # computes the whole result on every rank)
    supports_distributed: ClassVar[bool] = True
    # True: the test side itself runs collectives (LiSSA's all-reduced G·r), so distributed self-influence
    # steps all ranks in lockstep over the union of their chunks
    test_side_collective: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.train_: GradientSet | None = None
        self._train_store: GradientStore | None = None
        self._stats: dict[str, int] = {"passes": 0, "rows": 0}
        self._shared_stats: dict[str, int] | None = None  # set by a wrapping estimator (RRInfFixedPoint)
        self._row_scale: dict[str, torch.Tensor] | None = None  # per-coordinate scaling of every chunk read
        self._lam_cache: dict[tuple[str, ...], float] = {}  # damping_for's λ per block group, until the next fit

    # ------------------------------------------------------------------------- fitting
    def fit(self, train: GradientSet | torch.Tensor) -> Estimator:
        """Fit on the training gradients (a GradientSet, a GradientStore, or an (n, D) tensor). Returns ``self``.

        Raises:
            TypeError: not gradients, or a non-floating dtype.
            ValueError: ``damping="auto"`` on training gradients that are all zero where the method
                needs λ > 0: one message naming the zero blocks (all of them, or their count and the
                first few); ``distributed=True`` for a method that cannot split its rows; ranks that
                hold different numbers of training examples; method-specific problems and limits.
        """
        train = self._coerce(train, "train")
        self._train_store = train if isinstance(train, GradientStore) else None
        self.compute_dtype_ = self._compute_dtype(train)
        self.device_ = torch.device(self.options.device) if self.options.device is not None else train.device
        if self._train_store is not None:
            # rows are read chunk by chunk in the stored dtype and converted as they arrive
            self.train_ = train
        else:
            storage = self.compute_dtype_ if self.cast_storage else torch.promote_types(train.dtype, torch.float32)
            self.train_ = train.to(device=self.options.device, dtype=storage)
        self.n_ = train.n
        self.distributed_ = self._resolve_distributed()
        recorded = self._recorded_sq_sums(train)
        if self.distributed_:
            got = all_gather_objects((self.n_, recorded is not None))
            ns = [g[0] for g in got]
            if len(set(ns)) != 1:
                raise ValueError(f"{type(self).__name__}: the ranks hold different training sets (n per rank: {ns})")
            if not all(g[1] for g in got):  # every rank seeds, or none does (the first pass all-reduces)
                recorded = None
            self.rows_ = split_range(self.n_)
        else:
            self.rows_ = (0, self.n_)
        self._stats = self._shared_stats if self._shared_stats is not None else {"passes": 0, "rows": 0}
        self._sq_sums: dict[str, float] | None = recorded
        self._col_sq: dict[str, torch.Tensor] | None = None
        self._lam_cache: dict[tuple[str, ...], float] = {}
        if self.uses_damping:
            check_dict_damping(self.options.damping, self.train_.names, self.block_groups(), type(self).__name__)
        self._fit()
        return self

    def _recorded_sq_sums(self, train: GradientSet) -> dict[str, float] | None:
        """The per-block sums of squares a GradientStore recorded when it was written
        (:meth:`GradientStore.block_sq_sums`, global over all its rows, so any rank split may use them), when
        they are the sums of the rows this estimator computes on: the rows are read unscaled
        (no ``_row_scale``) and the compute dtype holds the stored values exactly. Else None (the first
        pass sums them, as for an in-memory GradientSet)."""
        if self._train_store is None or self._row_scale is not None:
            return None
        get = getattr(train, "block_sq_sums", None)
        sums = get() if callable(get) else None
        if sums is None or set(sums) != set(train.names):
            return None
        if torch.promote_types(train.dtype, self.compute_dtype_) != self.compute_dtype_:
            return None
        return {k: float(sums[k]) for k in train.names}

    def _resolve_distributed(self) -> bool:
        opt = self.options.distributed
        if not self.supports_distributed:
            if opt is True and is_distributed():
                raise ValueError(
                    f"{type(self).__name__}: distributed=True is not supported (each step couples all n training "
                    "rows); use distributed=False or 'auto' (every rank then computes the whole result)"
                )
            return False
        return is_distributed() if opt in ("auto", True) else False

    @property
    def passes_(self) -> int:
        """Passes over the training gradients since the last ``fit`` (fit's own included)."""
        return self._stats["passes"]

    @property
    def rows_read_(self) -> int:
        """Training rows this process read since the last ``fit`` (summed over passes)."""
        return self._stats["rows"]

    def _zero_damping_error(self) -> ValueError:
        """The error of a damping rule (``"auto"``, ``"paper"``, ``"mean_eig"``, ``"dof"``) that gives λ = 0 on
        all-zero training gradients: every zero block, or their count and the first three when there are more
        than five."""
        train = self._check_fitted()
        sums = self.block_sq_sums()
        zero = [k for k in train.names if not sums[k] > 0]
        if not zero:  # not exactly zero: the mean square underflowed in the compute dtype
            return ValueError(
                f"{type(self).__name__}: damping={self.options.damping!r} gives λ = 0 because the training "
                f"gradients' mean square underflows to 0 in {self.compute_dtype_}; pass an explicit damping "
                "(a positive float) or dtype=torch.float64"
            )
        shown = ", ".join(repr(k) for k in zero[: 5 if len(zero) <= 5 else 3])
        listing = f"({shown})" if len(zero) <= 5 else f"(e.g. {shown})"
        return ValueError(
            f"{type(self).__name__}: damping={self.options.damping!r} gives λ = 0 because the training gradients of "
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
        return test.to(device=self.device_, dtype=self.compute_dtype_)

    # ------------------------------------------------------------------------- streaming
    def _chunk(self, m: int) -> int:
        """Training rows per chunk: ``chunk_size``, or what fits a quarter of ``memory_budget`` with the
        chunk (stored and converted copies, (c, D) each) and its (m, c) scores."""
        if self.options.chunk_size is not None:
            return self.options.chunk_size
        isz = torch.empty((), dtype=self.compute_dtype_).element_size()
        per_row = isz * (2 * self._check_fitted().dim + 2 * max(m, 1))
        return max(1, min(self.n_, (self.options.memory_budget // 4) // per_row))

    def _self_chunk_size(self) -> int:
        """Rows per chunk when the chunk's rows are also the tests (self-influence): also keeps the
        (c, c) matrices of a test side that streams (DataInf, LiSSA) within the budget."""
        if self.options.chunk_size is not None:
            return self.options.chunk_size
        isz = torch.empty((), dtype=self.compute_dtype_).element_size()
        return max(1, min(self._chunk(1), math.isqrt(self.options.memory_budget // (8 * isz))))

    def _count_pass(self, rows: int) -> None:
        self._stats["passes"] += 1
        self._stats["rows"] += rows

    def _pass(self, chunk: int | None = None, start: int | None = None, stop: int | None = None, *, track=True):
        """One pass over the training rows ``[start, stop)`` (default: this rank's ``rows_``) in row chunks:
        yields ``(s, e, chunk)`` with ``chunk`` a GradientSet of rows s..e in the compute dtype and device
        (times ``_row_scale`` where set). Counts the pass; the first pass after ``fit`` also sums the
        squared entries per block (all-reduced at its end: every rank must run it)."""
        a, b = self.rows_ if start is None else (start, stop)
        chunk = chunk or self._chunk(1)
        self._stats["passes"] += 1
        track = track and self._sq_sums is None
        names = self.train_.names
        acc = torch.zeros(len(names), dtype=torch.float64, device=self.device_)  # on the device: no sync per chunk
        bufs: dict[str, torch.Tensor] = {}  # conversion buffers, reused chunk after chunk (no allocation churn)
        for s, part in _iter_rows(self.train_, chunk, a, b):
            e = s + part.n
            self._stats["rows"] += e - s
            part = self._converted(part, bufs)
            if self._row_scale is not None:
                part = GradientSet({k: part[k] * self._row_scale[k] for k in names}, validate=False)
            if track:
                for i, k in enumerate(names):
                    acc[i] += torch.linalg.vector_norm(part[k], dim=1).double().square().sum()
            yield s, e, part
        if track and self._sq_sums is None and (a, b) == self.rows_:
            acc = all_reduce_sum(acc) if self.distributed_ else acc
            self._sq_sums = dict(zip(names, acc.tolist(), strict=True))

    def _converted(self, part: GradientSet, bufs: dict[str, torch.Tensor]) -> GradientSet:
        """A chunk in the compute dtype and device: the chunk itself when it already is, else copied into
        ``bufs`` (one buffer per block, valid until the next chunk of the same pass)."""
        dt, dev = self.compute_dtype_, self.device_
        out = {}
        for k in part.names:
            x = part[k]
            if x.dtype == dt and x.device == dev:
                out[k] = x
                continue
            buf = bufs.get(k)
            if buf is None or buf.shape[0] < x.shape[0]:
                buf = bufs[k] = torch.empty(x.shape, dtype=dt, device=dev)
            out[k] = buf[: x.shape[0]].copy_(x)
        return GradientSet(out, validate=False)

    def block_sq_sums(self) -> dict[str, float]:
        """Σ_i ‖g_il‖² per block over all n training examples (float64, all ranks summed): what
        ``damping="auto"`` needs. One pass unless an earlier pass since ``fit`` already summed them, or the
        training GradientStore recorded them (then no pass)."""
        self._check_fitted()
        if self._sq_sums is None:
            for _ in self._pass():
                pass
        return self._sq_sums

    def column_sq_sums(self) -> dict[str, torch.Tensor]:
        """Σ_i g_iι² for every coordinate ι, per block: name -> (d_l,) float64 over all n examples (all ranks
        summed). One pass (cached until the next ``fit``); also fills :meth:`block_sq_sums`."""
        self._check_fitted()
        if self._col_sq is None:
            col = {k: torch.zeros(d, dtype=torch.float64, device=self.device_) for k, d in self.train_.dims.items()}
            for _, _, ch in self._pass():
                for k in col:
                    col[k] += ch[k].double().square().sum(0)
            if self.distributed_:
                col = {k: all_reduce_sum(v) for k, v in col.items()}
            self._col_sq = col
        return self._col_sq

    # ------------------------------------------------------------------------- damping
    def block_groups(self) -> list[list[str]]:
        """Blocks preconditioned together: one group per block (blockwise) or one group of all."""
        names = self._check_fitted().names
        return [[k] for k in names] if self.options.blockwise else [names]

    def damping_for(self, group: list[str], eigvals: Any = None) -> float:
        """Absolute λ of a block group: the explicit float, the dict's entry (per-block groups), or the rule
        ``damping`` resolves to (:meth:`EstimatorOptions.damping_rule`; ``"auto"`` is the class's
        ``default_damping``) computed from the training gradients: the papers' rule and ``"mean_eig"`` from
        the per-block sums of squares (one pass unless an earlier pass summed them), ``"dof"`` from the
        group's eigenvalues (``eigvals``: a callable returning the eigenvalues of G restricted to the group,
        when the method already holds that matrix; else one streamed Gram). Cached until the next ``fit``.
        See :func:`.damping.estimator_lambda`."""
        key = tuple(group)
        if key not in self._lam_cache:
            self._lam_cache[key] = estimator_lambda(self, group, eigvals)
        return self._lam_cache[key]

    @property
    def lambdas_(self) -> dict[str, float]:
        """λ used for each block (blocks of one group share it)."""
        return {k: self.damping_for(g) for g in self.block_groups() for k in g}

    # ------------------------------------------------------------------------- the two sides
    def _test_side(self, test: GradientSet) -> dict[str, torch.Tensor]:
        """Preconditioned test vectors a_l(t): name -> (m, d_l). Default: identity."""
        return {k: test[k] for k in test.names}

    def _train_side(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Train side b_l(g_i) of a chunk ``x`` (c, d_l) of block ``name`` (compute dtype). Default: x."""
        return x

    def _score_chunk(self, tside: dict[str, torch.Tensor], chunk: GradientSet) -> torch.Tensor:
        """−Σ_l a_l b_lᵀ for the chunk's rows: (m, c)."""
        out = None
        for k, a in tside.items():
            b = self._train_side(k, chunk[k])
            out = a @ b.T if out is None else out.addmm_(a, b.T)
        return out.neg_()

    def _gather_cols(self, x: torch.Tensor, gather: bool) -> torch.Tensor:
        """This rank's columns (last dim) -> all n columns on every rank, when asked and distributed."""
        if not (gather and self.distributed_):
            return x
        return gather_cat(x, dim=x.dim() - 1)

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

    def score(
        self, test: GradientSet | torch.Tensor, *, reduce: str | None = None, gather: bool = False
    ) -> torch.Tensor:
        """Influence of every training example on every test example.

        Returns (m, n) with row j = test example j, column i = training example i, or (n,) for
        ``reduce="mean"`` (influence on the mean test loss) / ``"sum"``. Positive = harmful.
        Distributed (see the class docstring): this rank's columns ``rows_[0]:rows_[1]`` only, unless
        ``gather=True`` (then all n columns on every rank).

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
            s = s * m if reduce == "sum" else s
        else:
            s = self._score(test)
        return self._gather_cols(s, gather)

    def _score(self, test: GradientSet) -> torch.Tensor:
        """(m, stop − start) scores of this rank's training rows: one pass."""
        tside = self._test_side(test)
        a, b = self.rows_
        out = torch.empty(test.n, b - a, dtype=self.compute_dtype_, device=self.device_)
        for s, e, ch in self._pass(self._chunk(test.n)):
            out[:, s - a : e - a] = self._score_chunk(tside, ch)
        return out

    def topk(
        self, test: GradientSet | torch.Tensor, k: int, *, largest: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The k largest (or smallest) scores per test example, without forming the (m, n) matrix.

        Returns ``(values (m, k), indices (m, k))`` sorted like ``torch.topk``; indices are global
        training rows. Distributed: merged across ranks, the same result on every rank.

        Raises:
            StoreError: train and test stores of different models or adapters, as in :meth:`score`.
            ValueError: ``k`` not in [1, n]; test blocks that do not match the training blocks.
        """
        test = self._prep_test(test)
        self._check_k(k, self.n_)
        vals, idx = self._topk(test, k, largest)
        return self._merge_ranks(vals, idx, k, largest, test.n)

    def _merge_ranks(self, vals, idx, k: int, largest: bool, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        if vals is None:  # a rank without rows
            vals = torch.empty(m, 0, dtype=self.compute_dtype_, device=self.device_)
            idx = torch.empty(m, 0, dtype=torch.int64, device=self.device_)
        if not self.distributed_:
            return vals, idx
        allv, alli = gather_cat(vals, dim=1), gather_cat(idx, dim=1)
        v, sel = torch.topk(allv, k, dim=1, largest=largest)
        return v, torch.gather(alli, 1, sel)

    def _topk(self, test: GradientSet, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
        tside = self._test_side(test)
        vals = idx = None
        for s, _, ch in self._pass(self._chunk(test.n)):
            vals, idx = merge_topk(vals, idx, self._score_chunk(tside, ch), s, k, largest)
        return vals, idx

    def self_influence(self, *, gather: bool = False) -> torch.Tensor:
        """I(i, i) with t = g_i for every training example: (n,). Positive = harmful.

        Distributed: this rank's rows ``rows_[0]:rows_[1]``, or all n on every rank with ``gather=True``."""
        self._check_fitted()
        a, b = self.rows_
        if self.distributed_ and self.test_side_collective:
            return self._gather_cols(self._self_influence_lockstep(), gather)
        out = torch.empty(b - a, dtype=self.compute_dtype_, device=self.device_)
        for s, e, ch in self._pass(self._self_chunk_size()):
            out[s - a : e - a] = self._self_chunk(ch)
        return self._gather_cols(out, gather)

    def _self_influence_lockstep(self) -> torch.Tensor:
        """Distributed self-influence for a test side with collectives: at each step every rank reads its
        next chunk of own rows, the chunks are all-gathered (tests: small), the test side of their union is
        computed together, and each rank keeps its own rows. All ranks take the same number of steps."""
        a, b = self.rows_
        chunk = self._self_chunk_size()
        p = world_size()
        sizes = [e - s for s, e in (split_range(self.n_, r, p) for r in range(p))]
        steps = max(-(-c // chunk) for c in sizes)
        out = torch.empty(b - a, dtype=self.compute_dtype_, device=self.device_)
        it = iter(self._pass(chunk, track=False))
        names = self.train_.names
        for _ in range(steps):
            item = next(it, None)
            own = {k: item[2][k].cpu() for k in names} if item is not None else None
            parts = all_gather_objects(own)
            union = GradientSet(
                {k: torch.cat([q[k] for q in parts if q is not None]).to(self.device_) for k in names}, validate=False
            )
            tside = self._test_side(union)  # collective: every rank, every step
            if item is None:
                continue
            s, e, ch = item
            off = sum(q[names[0]].shape[0] for q in parts[: rank()] if q is not None)
            acc = None
            for k, t in tside.items():
                v = (t[off : off + e - s] * self._train_side(k, ch[k])).sum(1)
                acc = v if acc is None else acc + v
            out[s - a : e - a] = -acc
        next(it, None)
        return out

    def _self_chunk(self, ch: GradientSet) -> torch.Tensor:
        """−Σ_l a_l(g_i)ᵀ b_l(g_i) for the rows of a chunk: (c,)."""
        tside = self._test_side(ch)
        acc = None
        for k, a in tside.items():
            v = (a * self._train_side(k, ch[k])).sum(1)
            acc = v if acc is None else acc + v
        return -acc
