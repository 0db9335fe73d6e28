"""Label-free damping (METHODS.md §10): λ chosen from the gradients alone, never from evaluation labels.

:func:`select_damping` returns λ (a float, or a dict block → λ with ``blockwise=True``) for any estimator's
``damping=``. Rules, with G = PᵀP / n (P the (n, D) training gradients, or one block's columns):

* ``"gcv"`` (needs ``test``): generalised cross-validation of the ridge regression of the mean test
  gradient t̄ on the training gradients. S_λ = Pᵀ(PPᵀ + nλI)⁻¹P, tr S_λ = Σ_k σ_k/(σ_k + nλ) (σ_k the
  eigenvalues of PPᵀ), GCV(λ) = D·‖t̄ − S_λ t̄‖² / (D − tr S_λ)²; the minimiser over
  λ = paper_λ · 10^(k/10), k = −60 … 60 (:data:`GCV_EXPONENTS`), or over ``grid=`` (absolute λ values).
* ``"mean_eig"``: λ = c · tr(G) / min(n, D), c times the mean non-zero eigenvalue of G (option ``c``).
* ``"dof"``: λ at which the effective degrees of freedom Σ_k σ_k/(σ_k + λ) (σ_k the eigenvalues of G)
  equal ``share`` · r, r the rank of G (its eigenvalues above round-off); solved by bisection on log λ
  (option ``share``, in (0, 1)). r = min(n, D) for gradients of full rank, the generic case (METHODS.md
  §10 states the target as share · min(n, D)); a rank-deficient block — e.g. the bias of a two-class head,
  whose per-example gradients are ±(same vector), rank 1 — would otherwise get a target it cannot reach.
* ``"paper"``: the papers' rule, λ = c · tr(G) / D = c × the mean squared gradient entry (c = 0.1).

:data:`LABEL_FREE_RULE` = ``("mean_eig", {"c": 10.0})`` is the default label-free configuration: the rule and
constant that ``bench/bench_damping.py`` chose for exact influence on Rotten Tomatoes only (issue 12's
protocol; ``dof`` with share 0.05 tied with it there, and ``mean_eig`` needs no eigendecomposition) and
validated unchanged on the held-out math, gsm and digits tasks; ``damping="auto"`` of :class:`Exact` is this
rule. It is the λ of the "exact (label-free λ)" and "datainf (label-free λ)" rows of every experiment
(for DataInf, block-wise, no label-free rule beat the papers' λ in that study: see bench/README.md). Pass it as
``damping=LABEL_FREE_RULE`` to an estimator (resolved at fit from the training gradients), or as
``select_damping(train, rule=LABEL_FREE_RULE[0], **LABEL_FREE_RULE[1])``.

Cost: ``"paper"`` and ``"mean_eig"`` need the per-block sums of squares only (one pass, none on a store that
recorded them). ``"gcv"`` and ``"dof"`` need the spectrum of G: one eigendecomposition per block group of the
n×n Gram PPᵀ or the D×D matrix PᵀP, whichever is smaller, in float64, which serves every λ. The D×D matrix
takes one pass over the training rows; the n×n Gram is built from pairs of row chunks (upper triangle,
⌈n/chunk⌉ passes over shrinking row ranges). Rows are streamed by chunks (``iter_chunks``), from memory or
from a :class:`~fastinf.gradients.store.GradientStore` alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..distributed import all_reduce_sum
from ..gradients.gradient_set import GradientSet

__all__ = [
    "DOF_SHARE",
    "ESTIMATOR_RULES",
    "GCV_EXPONENTS",
    "LABEL_FREE_RULE",
    "MEAN_EIG_C",
    "PAPER_C",
    "RULES",
    "check_dict_damping",
    "check_rule",
    "dof_lambda",
    "estimator_lambda",
    "gcv_curve",
    "group_spectra",
    "select_damping",
]

RULES = ("gcv", "mean_eig", "dof", "paper")
# rules an estimator can resolve at fit from its training gradients ('gcv' also needs the test gradients)
ESTIMATOR_RULES = ("paper", "mean_eig", "dof")
PAPER_C = 0.1  # both papers' coefficient of the mean squared entry (METHODS.md §0)
MEAN_EIG_C = 10.0  # chosen on Rotten Tomatoes by bench/bench_damping.py (for exact)
DOF_SHARE = 0.05  # chosen on Rotten Tomatoes by bench/bench_damping.py (for exact)
LABEL_FREE_RULE: tuple[str, dict[str, float]] = ("mean_eig", {"c": MEAN_EIG_C})
GCV_EXPONENTS = tuple(range(-60, 61))  # GCV grid: paper λ · 10^(k/10)
_DEFAULTS: dict[str, dict[str, float]] = {
    "gcv": {},
    "mean_eig": {"c": MEAN_EIG_C},
    "dof": {"share": DOF_SHARE},
    "paper": {"c": PAPER_C},
}
_RULE_LIST = ", ".join(repr(r) for r in RULES)


def _real(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def check_rule(rule: Any, options: Mapping[str, Any] | None = None) -> tuple[str, dict[str, float]]:
    """``(rule, options)`` validated, the rule's defaults filled in.

    Raises:
        ValueError: an unknown rule (listing the rules), an option the rule does not take, ``c`` not a
            positive finite number, ``share`` not in (0, 1).
    """
    if not isinstance(rule, str) or rule not in RULES:
        raise ValueError(f"unknown damping rule {rule!r}; the rules are {_RULE_LIST}")
    options = dict(options or {})
    allowed = _DEFAULTS[rule]
    extra = sorted(set(options) - set(allowed))
    if extra:
        takes = ", ".join(repr(k) for k in allowed) or "none"
        raise ValueError(f"damping rule {rule!r} takes no option(s) {extra}; its options: {takes}")
    out = {**allowed, **options}
    if "c" in out and not (_real(out["c"]) and out["c"] > 0):
        raise ValueError(f"damping rule {rule!r}: c must be a positive finite number, got {out['c']!r}")
    if "share" in out and not (_real(out["share"]) and 0 < out["share"] < 1):
        raise ValueError(f"damping rule {rule!r}: share must be a number in (0, 1), got {out['share']!r}")
    return rule, {k: float(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------- spectra
@dataclass
class Spectrum:
    """What the rules need of one block group: n, the width D_g, ‖P‖²_F, the eigenvalues of PPᵀ (equal to
    the non-zero ones of PᵀP; unnormalised, float64, those below round-off set to 0) and, for GCV, the
    squared coordinates ``proj2`` of t̄ on the matching right singular vectors and ‖t̄‖²."""

    n: int
    width: int
    sq_sum: float
    eig: torch.Tensor | None = None
    proj2: torch.Tensor | None = None
    t_sq: float | None = None

    @property
    def paper_lambda(self) -> float:
        return PAPER_C * self.sq_sum / (self.n * self.width)


RowsFn = Callable[[int, int], Iterable[tuple[int, GradientSet]]]


def _cat(gs: GradientSet, group: Sequence[str], device: Any = None) -> torch.Tensor:
    xs = [gs[k].to(device=device, dtype=torch.float64) for k in group]
    return xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)


def group_spectra(
    rows: RowsFn,
    n: int,
    dims: Mapping[str, int],
    groups: Sequence[Sequence[str]],
    *,
    span: tuple[int, int] | None = None,
    test_mean: Mapping[str, torch.Tensor] | None = None,
    n_space: bool = True,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: Any = None,
) -> dict[tuple[str, ...], Spectrum]:
    """Eigen-spectra of every block group from one streaming computation (float64).

    ``rows(start, stop)`` yields ``(offset, chunk)`` over the training rows; ``span`` is the range this
    process owns (default all n). A group of width D_g ≤ n (or every group when ``n_space=False``)
    accumulates PᵀP in one pass (all-reduced by ``reduce`` when given); a wider group builds the n×n Gram
    PPᵀ from pairs of row chunks (needs every row: one process only). With ``test_mean`` (block → (D_l,))
    the squared projections of t̄ are kept too (GCV).
    """
    a, b = span or (0, n)
    groups = [tuple(g) for g in groups]
    width = {g: sum(dims[k] for k in g) for g in groups}
    nsp = {g: n_space and width[g] > n for g in groups}
    if any(nsp.values()) and reduce is not None:
        raise ValueError("the n×n Gram pairs rows of different ranks; use the D×D form when distributed")
    device = torch.device("cpu") if device is None else torch.device(device)
    kw = {"dtype": torch.float64, "device": device}
    H = {g: torch.zeros(width[g], width[g], **kw) for g in groups if not nsp[g]}
    K = {g: torch.zeros(n, n, **kw) for g in groups if nsp[g]}
    tbar = {g: torch.cat([test_mean[k].to(**kw) for k in g]) for g in groups} if test_mean is not None else None
    u = {g: torch.zeros(n, **kw) for g in K} if tbar is not None else {}
    sq = torch.zeros(len(groups), **kw)
    for s, ch in rows(a, b):
        e = s + ch.n
        X = {g: _cat(ch, g, device) for g in groups}  # rows meet the matrices on their device
        for i, g in enumerate(groups):
            sq[i] += X[g].square().sum()
            if g in H:
                H[g].addmm_(X[g].T, X[g])
            else:
                K[g][s:e, s:e] = X[g] @ X[g].T
                if g in u:
                    u[g][s:e] = X[g] @ tbar[g]
        if K and e < n:  # the rest of this chunk's rows of the Gram: one pass over the later rows
            for s2, ch2 in rows(e, n):
                e2 = s2 + ch2.n
                for g in K:
                    blk = X[g] @ _cat(ch2, g, device).T
                    K[g][s:e, s2:e2] = blk
                    K[g][s2:e2, s:e] = blk.T
    if reduce is not None:
        sq = reduce(sq)
        H = {g: reduce(h) for g, h in H.items()}
    out = {}
    for i, g in enumerate(groups):
        spec = Spectrum(n=n, width=width[g], sq_sum=float(sq[i]))
        M = H[g] if g in H else K.pop(g)
        if tbar is None:
            w, V = torch.linalg.eigvalsh(M), None
        else:
            w, V = torch.linalg.eigh(M)
        tol = float(w.abs().max()) * max(n, width[g]) * torch.finfo(torch.float64).eps if w.numel() else 0.0
        keep = w > tol
        spec.eig = torch.where(keep, w, torch.zeros_like(w))
        if tbar is not None:
            if g in H:
                p = (V.T @ tbar[g]).square()
            else:  # v_k = Pᵀu_k/√σ_k, so v_kᵀt̄ = u_kᵀ(Pt̄)/√σ_k
                p = (V.T @ u[g]).square() / torch.where(keep, w, torch.ones_like(w))
            spec.proj2 = torch.where(keep, p, torch.zeros_like(p))
            spec.t_sq = float(tbar[g].square().sum())
        out[g] = spec
        del M, V
    return out


# ----------------------------------------------------------------------------------------------- the rules
def gcv_curve(spec: Spectrum, lambdas: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """GCV(λ) = D·‖t̄ − S_λ t̄‖² / (D − tr S_λ)² for each λ (METHODS.md §10), from a group's spectrum
    (with projections); +inf where D − tr S_λ vanishes (n ≥ D and λ → 0)."""
    lam = torch.as_tensor(lambdas, dtype=torch.float64, device=spec.eig.device).reshape(-1, 1)
    nl = spec.n * lam
    sig = spec.eig.reshape(1, -1)
    w = nl / (sig + nl)
    rest = max(spec.t_sq - float(spec.proj2.sum()), 0.0)  # the part of t̄ outside the row space of P
    rss = (w.square() * spec.proj2).sum(1) + rest
    den = spec.width - (sig / (sig + nl)).sum(1)
    vals = spec.width * rss / den.square()
    return torch.where(den > spec.width * 1e-12, vals, torch.full_like(vals, math.inf))


def dof_lambda(eig_g: torch.Tensor, share: float) -> float:
    """λ with Σ_k σ_k/(σ_k + λ) = share · r, σ_k the eigenvalues of G (those at round-off already set to 0,
    see :func:`group_spectra`), r the number of positive ones; bisection on log λ.

    Raises:
        ValueError: ``share`` not in (0, 1); no positive eigenvalue.
    """
    pos = eig_g[eig_g > 0].to(torch.float64)
    r = int(pos.numel())
    target = share * r
    if not (0 < share < 1 and r > 0):
        raise ValueError(f"damping rule 'dof': needs a share in (0, 1) and gradients that are not all zero (rank {r})")

    def dof(log_lam: float) -> float:
        return float((pos / (pos + math.exp(log_lam))).sum())

    lo, hi = math.log(float(pos.min())), math.log(float(pos.max()))
    while dof(lo) <= target:
        lo -= 10.0
    while dof(hi) >= target:
        hi += 10.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if dof(mid) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13:
            break
    return math.exp(0.5 * (lo + hi))


def rule_lambda(rule: str, opts: Mapping[str, float], spec: Spectrum, grid: Sequence[float] | None = None) -> float:
    """λ of one block group under a validated rule (see :func:`check_rule`)."""
    n, w = spec.n, spec.width
    if rule == "paper":
        return opts["c"] * spec.sq_sum / (n * w)
    if rule == "mean_eig":
        return opts["c"] * spec.sq_sum / (n * min(n, w))
    if rule == "dof":
        return dof_lambda(spec.eig / n, opts["share"])
    lams = torch.as_tensor(
        grid if grid is not None else [spec.paper_lambda * 10.0 ** (k / 10) for k in GCV_EXPONENTS],
        dtype=torch.float64,
    )
    vals = gcv_curve(spec, lams)
    return float(lams[int(torch.argmin(vals))])


# ----------------------------------------------------------------------------------------------- estimators
def estimator_lambda(est: Any, group: Sequence[str], eigvals: Callable[[], torch.Tensor] | None = None) -> float:
    """λ of one block group of a fitted gradient estimator (``Estimator.damping_for`` caches it): the explicit
    float, the dict's entry, or the rule ``est.options.damping`` resolves to, from the estimator's own passes
    over its training gradients (counted in ``passes_``; sums of squares shared with its other passes).

    Raises:
        ValueError: the rule gives λ = 0 where the method needs λ > 0 (all-zero gradients), a ``dof``
            Gram beyond ``memory_budget``.
    """
    d = est.options.damping
    if isinstance(d, dict):
        return d[group[0]]  # per-block groups only: checked at fit (check_dict_damping)
    rule = est.options.damping_rule(est.default_damping)
    if rule is None:
        return d
    name, opts = rule
    train = est._check_fitted()
    n = train.n
    sums = est.block_sq_sums()
    tot = sum(sums[k] for k in group)
    width = sum(train.dims[k] for k in group)
    if name == "paper":
        lam = opts["c"] * tot / (n * width)
    elif name == "mean_eig":
        lam = opts["c"] * tot / (n * min(n, width))
    elif not tot > 0:
        lam = 0.0
    else:  # dof
        eig = (eigvals() if eigvals is not None else _estimator_eigvals(est, group)).to(torch.float64).cpu()
        tol = float(eig.abs().max()) * max(n, width) * torch.finfo(torch.float64).eps
        lam = dof_lambda(torch.where(eig > tol, eig, torch.zeros_like(eig)), opts["share"])
    if not lam > 0 and est.requires_positive_damping:
        raise est._zero_damping_error()
    return lam


def _estimator_eigvals(est: Any, group: Sequence[str]) -> torch.Tensor:
    """Eigenvalues of G restricted to a block group (float64), from one Gram streamed by the estimator's own
    passes: the D_g×D_g matrix (one pass; all-reduced across ranks) or, when n < D_g on one process, the
    n×n Gram from pairs of row chunks. Refused beyond ``memory_budget``."""
    train, n = est.train_, est.n_
    width = sum(train.dims[k] for k in group)
    n_space = width > n and not est.distributed_
    side = n if n_space else width
    if 8 * side * side > est.options.memory_budget:
        raise ValueError(
            f"{type(est).__name__}: damping rule 'dof' needs a {side}×{side} float64 eigendecomposition "
            f"({8 * side * side / 2**30:.3g} GiB), more than memory_budget = "
            f"{est.options.memory_budget / 2**30:.3g} GiB; pass an explicit λ (fastinf.select_damping) or use "
            "damping='mean_eig'"
        )
    chunk = est._chunk(1)

    def rows(a: int, b: int):
        return ((s, ch) for s, _, ch in est._pass(chunk, a, b)) if b > a else ()

    reduce = all_reduce_sum if est.distributed_ else None
    spec = group_spectra(
        rows, n, train.dims, [group], span=est.rows_, n_space=n_space, reduce=reduce, device=est.device_
    )
    return spec[tuple(group)].eig / n


def check_dict_damping(damping: Any, names: Sequence[str], groups: Sequence[Sequence[str]], who: str) -> None:
    """A dict ``damping`` names exactly the training blocks, and every group it is used with is one block.

    Raises:
        ValueError: missing or unknown block names; a global (multi-block) preconditioner.
    """
    if not isinstance(damping, dict):
        return
    missing, extra = [k for k in names if k not in damping], sorted(k for k in damping if k not in names)
    if missing or extra:
        more = lambda x: f"{x[:5]}{' …' if len(x) > 5 else ''}"  # noqa: E731
        raise ValueError(
            f"{who}: damping dict must name every training block and no other: missing {more(missing)}, "
            f"unknown {more(extra)}"
        )
    if any(len(g) > 1 for g in groups):
        raise ValueError(
            f"{who}: damping as a dict block→λ needs a per-block preconditioner (blockwise=True); this one is "
            f"global over {len(names)} blocks: pass one λ (a float)"
        )


# ----------------------------------------------------------------------------------------------- public
def _as_set(x: Any, what: str) -> GradientSet:
    if isinstance(x, torch.Tensor):
        if x.dim() != 2 or not x.is_floating_point():
            raise TypeError(f"select_damping: {what} must be a GradientSet, a GradientStore or a float (n, D) tensor")
        return GradientSet.from_matrix(x)
    if not isinstance(x, GradientSet):
        raise TypeError(
            f"select_damping: {what} must be a GradientSet, a GradientStore or an (n, D) tensor, got {type(x).__name__}"
        )
    return x


def _test_mean(test: GradientSet, train: GradientSet, chunk: int) -> dict[str, torch.Tensor]:
    """Mean test gradient per training block (float64), streamed; an 'all' matrix is split by block."""
    split = test.names == ["all"] and train.names != ["all"]
    if split and test.dim != train.dim:
        raise ValueError(f"select_damping: test has width {test.dim} but the training gradients have D = {train.dim}")
    if not split:
        if set(test.names) != set(train.names):
            missing, extra = sorted(set(train.names) - set(test.names)), sorted(set(test.names) - set(train.names))
            raise ValueError(f"select_damping: test blocks do not match the training blocks: missing {missing}, "
                             f"unexpected {extra}")  # fmt: skip
        bad = [k for k in train.names if test.dims[k] != train.dims[k]]
        if bad:
            raise ValueError(f"select_damping: test block {bad[0]!r} has width {test.dims[bad[0]]} but the training "
                             f"block has width {train.dims[bad[0]]}")  # fmt: skip
    if test.n < 1:
        raise ValueError("select_damping: test holds no examples")
    acc: dict[str, torch.Tensor] = {}
    for _, ch in test.iter_chunks(chunk):
        for k in ch.names:
            v = ch[k].to(torch.float64).sum(0)
            acc[k] = v if k not in acc else acc[k] + v
    if split:
        allv, off, acc = acc["all"], 0, {}
        for k, d in train.dims.items():
            acc[k] = allv[off : off + d]
            off += d
    return {k: acc[k] / test.n for k in train.names}


def select_damping(
    train: GradientSet | torch.Tensor,
    test: GradientSet | torch.Tensor | None = None,
    rule: str = "gcv",
    blockwise: bool = False,
    grid: Sequence[float] | None = None,
    *,
    chunk_size: int | None = None,
    memory_budget: int = 1 << 30,
    **rule_options: Any,
) -> float | dict[str, float]:
    """λ chosen from the gradients alone (METHODS.md §10): a float, or block → λ with ``blockwise=True``
    (each block's λ from that block's gradients). Pass it as ``damping=`` to any estimator.

    Args:
        train: training gradients: a GradientSet, a GradientStore (streamed by row chunks) or an (n, D) tensor.
        test: test gradients (same blocks), needed by ``rule="gcv"`` only (their mean t̄ is regressed).
        rule: ``"gcv"``, ``"mean_eig"`` (option ``c``), ``"dof"`` (option ``share``) or ``"paper"`` (option ``c``,
            default 0.1); see the module docstring.
        blockwise: one λ per block (dict) instead of one global λ.
        grid: GCV only: absolute λ values to search (default: paper λ · 10^(k/10), k = −60 … 60).
        chunk_size: training rows per chunk (default: ~64 MiB of float64 rows).
        memory_budget: bytes; GCV and dof refuse an eigendecomposition of a matrix (min(n, D_g)² float64
            entries, ×2 with GCV's eigenvectors) larger than this.
        **rule_options: the rule's constant (``c`` or ``share``).

    Raises:
        ValueError: an unknown rule (the message lists the rules), ``gcv`` without ``test``, a bad ``c`` /
            ``share`` / option / ``grid``, training gradients (of a block, with ``blockwise``) that are all
            zero, a zero mean test gradient (GCV), mismatched test blocks, a matrix beyond ``memory_budget``.
        TypeError: inputs that are not gradients.
    """
    rule, opts = check_rule(rule, rule_options)
    if rule == "gcv" and test is None:
        raise ValueError("select_damping: rule 'gcv' needs the test gradients: select_damping(train, test, rule='gcv')")
    if grid is not None:
        if rule != "gcv":
            raise ValueError(f"select_damping: grid= is searched by rule 'gcv' only, not by {rule!r}")
        grid = [float(x) for x in grid]
        if not grid or not all(math.isfinite(x) and x > 0 for x in grid):
            raise ValueError("select_damping: grid must be a non-empty sequence of positive finite λ values")
    if not isinstance(blockwise, bool):
        raise ValueError(f"select_damping: blockwise must be a bool, got {blockwise!r}")
    train = _as_set(train, "train")
    n, dims = train.n, train.dims
    if n < 1:
        raise ValueError("select_damping: train holds no examples")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"select_damping: chunk_size must be a positive int or None, got {chunk_size!r}")
    chunk = chunk_size or max(1, min(n, (64 << 20) // (8 * max(train.dim, 1))))
    groups = [[k] for k in train.names] if blockwise else [train.names]
    tmean = _test_mean(_as_set(test, "test"), train, chunk) if rule == "gcv" else None

    def rows(start: int, stop: int):
        return train.iter_chunks(chunk, start=start, stop=stop) if stop > start else ()

    if rule in ("paper", "mean_eig"):
        sums = getattr(train, "block_sq_sums", None)
        sums = sums() if callable(sums) else None
        if sums is None:
            acc = dict.fromkeys(train.names, 0.0)
            for _, ch in rows(0, n):
                for k in train.names:
                    acc[k] += float(ch[k].to(torch.float64).square().sum())
            sums = acc
        specs = {
            tuple(g): Spectrum(n=n, width=sum(dims[k] for k in g), sq_sum=math.fsum(sums[k] for k in g)) for g in groups
        }
    else:
        # groups are processed in batches whose matrices fit memory_budget together (one streamed pass each),
        # so blockwise=True over hundreds of blocks never holds every block's Gram at once
        batches: list[list[list[str]]] = [[]]
        used = 0
        for g in groups:
            side = min(n, sum(dims[k] for k in g))
            need = 8 * side * side * (2 if rule == "gcv" else 1)
            if need > memory_budget:
                raise ValueError(
                    f"select_damping: rule {rule!r} needs a {side}×{side} float64 eigendecomposition "
                    f"({need / 2**30:.3g} GiB), more than memory_budget = {memory_budget / 2**30:.3g} GiB; "
                    "project the gradients, use blockwise=True, or raise memory_budget"
                )
            if batches[-1] and used + need > memory_budget:
                batches.append([])
                used = 0
            batches[-1].append(g)
            used += need
        specs = {}
        for batch in batches:  # the Grams are built where the rows are (a store's: CPU)
            specs.update(group_spectra(rows, n, dims, batch, test_mean=tmean, device=train.device))
    zero = [k for g in groups if not specs[tuple(g)].sq_sum > 0 for k in g]
    if zero:
        shown = ", ".join(repr(k) for k in zero[:5])
        what = "are all zero" if len(zero) == len(train.names) else f"of {len(zero)} block(s) ({shown}) are all zero"
        raise ValueError(f"select_damping: the training gradients {what}; no λ can be chosen from them")
    if tmean is not None:
        zt = [k for g in groups if not specs[tuple(g)].t_sq > 0 for k in g]
        if zt:
            what = "is zero" if len(zt) == len(train.names) else f"of block(s) {', '.join(map(repr, zt[:5]))} is zero"
            raise ValueError(f"select_damping: rule 'gcv': the mean test gradient {what}; GCV cannot choose λ")
    lam = {tuple(g): rule_lambda(rule, opts, specs[tuple(g)], grid) for g in groups}
    if not blockwise:
        return lam[tuple(groups[0])]
    return {g[0]: v for g, v in lam.items()}
