"""Evaluation metrics for influence scores (METHODS.md §9). NumPy only, no scikit-learn.

Conventions (METHODS.md §0): scores are "positive = harmful". Mislabelled-data detection ranks
training examples by the aggregated score, largest first; class detection ranks training examples
by −I[j, :] (most helpful first). Ties are handled as their expectation under a random order of the
tied examples: average ranks in the AUC, linear interpolation inside a tied group in the detection
curve and in recall@k.

Every function accepts torch tensors, NumPy arrays or sequences, computes in float64 and raises
``ValueError`` for mismatched shapes, NaN/inf scores and labels with a single class.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

__all__ = [
    "agreement",
    "bootstrap_ci",
    "class_detection",
    "detection_curve",
    "lds",
    "mislabel_auc",
    "rank_average",
    "roc_auc",
]


# ----------------------------------------------------------------------------------- input checks
def _to_numpy(x: Any, what: str) -> np.ndarray:
    """A NumPy view/copy of a tensor, array or sequence (torch tensors are detached and moved to CPU)."""
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            if x.dtype == torch.bfloat16 or x.dtype == torch.float16:
                x = x.float()
            return x.numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    try:
        return np.asarray(x)
    except Exception as e:
        raise TypeError(f"{what}: expected a tensor, array or sequence, got {type(x).__name__}") from e


def _scores(x: Any, what: str, ndim: int | None = 1) -> np.ndarray:
    a = _to_numpy(x, what)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise TypeError(f"{what}: expected numeric values, got dtype {a.dtype}")
    a = a.astype(np.float64, copy=False)
    if ndim is not None and a.ndim != ndim:
        want = "(n,)" if ndim == 1 else "(m, n)"
        raise ValueError(f"{what}: expected shape {want}, got {a.shape}")
    if a.size == 0:
        raise ValueError(f"{what}: is empty")
    bad = ~np.isfinite(a)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        first_s = first[0] if len(first) == 1 else first
        raise ValueError(f"{what}: {int(bad.sum())} non-finite value(s) (NaN or inf), first at index {first_s}")
    return a


def _binary(x: Any, what: str, n: int) -> np.ndarray:
    a = _to_numpy(x, what)
    if a.ndim != 1:
        raise ValueError(f"{what}: expected shape ({n},), got {a.shape}")
    if a.shape[0] != n:
        raise ValueError(f"{what}: has {a.shape[0]} entries but scores have {n}")
    if a.dtype == np.bool_:
        return a
    if not np.issubdtype(a.dtype, np.number):
        raise TypeError(f"{what}: expected booleans or 0/1 values, got dtype {a.dtype}")
    vals = np.unique(a)
    if not np.isin(vals, [0, 1]).all():
        raise ValueError(f"{what}: expected booleans or 0/1 values, got values {vals[:5].tolist()}")
    return a.astype(bool)


def _need_both_classes(y: np.ndarray, what: str) -> None:
    npos = int(y.sum())
    if npos == 0 or npos == y.shape[0]:
        kind = "no" if npos == 0 else "only"
        raise ValueError(f"{what}: {kind} positive labels ({npos} of {y.shape[0]}); the AUC needs both classes")


# ----------------------------------------------------------------------------------- ranks and AUC
def rank_average(x: Any) -> np.ndarray:
    """1-based ranks of a 1-D array, ties given the average of the ranks they span (like scipy's rankdata)."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"rank_average: expected a 1-D array, got shape {a.shape}")
    n = a.shape[0]
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    new_group = np.empty(n, dtype=bool)
    if n:
        new_group[0] = True
        new_group[1:] = s[1:] != s[:-1]
    group = np.cumsum(new_group) - 1
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], n)  # exclusive
    avg = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = avg[group]
    return ranks


def _auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann–Whitney AUC from average ranks: P(score_pos > score_neg) + ½ P(tie)."""
    r = rank_average(scores)
    npos = int(positive.sum())
    nneg = positive.shape[0] - npos
    return float((r[positive].sum() - npos * (npos + 1) / 2.0) / (npos * nneg))


def roc_auc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve of ``scores`` (n,) for the binary ``labels`` (n,), ties averaged.

    Equals the probability that a random positive scores above a random negative, counting ties as ½.
    """
    s = _scores(scores, "scores")
    y = _binary(labels, "labels", s.shape[0])
    _need_both_classes(y, "labels")
    return _auc(s, y)


def mislabel_auc(scores: Any, is_flipped: Any) -> float:
    """ROC AUC of the aggregated influence ``scores`` (n,) for detecting the flipped examples.

    Positive = harmful, so flipped examples should score high: AUC = roc_auc(is_flipped, scores)
    (METHODS.md §9). 1.0 = every flipped example ranks above every clean one; 0.5 = chance.
    """
    s = _scores(scores, "scores")
    y = _binary(is_flipped, "is_flipped", s.shape[0])
    _need_both_classes(y, "is_flipped")
    return _auc(s, y)


def detection_curve(scores: Any, is_flipped: Any) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of flipped examples found vs fraction of the training set inspected.

    Examples are inspected by descending score. Returns ``(fraction_inspected, fraction_found)``, two
    float64 arrays of length n + 1 from (0, 0) to (1, 1); both are non-decreasing. Inside a group of
    tied scores the found fraction grows linearly (its expectation under a random order of the group).
    """
    s = _scores(scores, "scores")
    n = s.shape[0]
    y = _binary(is_flipped, "is_flipped", n)
    npos = int(y.sum())
    if npos == 0:
        raise ValueError("is_flipped: no flipped examples, the detection curve is undefined")
    order = np.argsort(-s, kind="mergesort")
    ss, ys = s[order], y[order].astype(np.float64)
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = ss[1:] != ss[:-1]
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], n)
    pos_before = np.concatenate([[0.0], np.cumsum(ys)])[starts]  # positives before each group
    pos_in = np.add.reduceat(ys, starts)
    size = (ends - starts).astype(np.float64)
    group = np.cumsum(new_group) - 1
    k = np.arange(1, n + 1)  # examples inspected
    found = pos_before[group] + (k - starts[group]) * (pos_in[group] / size[group])
    inspected = np.concatenate([[0.0], k / n])
    return inspected, np.concatenate([[0.0], found / npos])


# ----------------------------------------------------------------------------------- class detection
def _expected_hits_lowest(scores: np.ndarray, same: np.ndarray, k: int) -> float:
    """Expected number of ``same`` among the k lowest scores (ties at the boundary split evenly)."""
    v = np.partition(scores, k - 1)[k - 1]  # k-th smallest
    below = scores < v
    at = scores == v
    a = int(below.sum())
    return float(same[below].sum()) + (k - a) * float(same[at].sum()) / float(at.sum())


def class_detection(scores: Any, train_labels: Any, test_labels: Any) -> dict[str, tuple[float, float]]:
    """Class detection from an (m, n) score matrix (METHODS.md §9).

    For test example j, the training examples of its class are the positives:
    AUC_j = roc_auc(same_class, −scores[j, :]) and recall@k_j = share of same-class examples among the
    k_j lowest scores (the most helpful), with k_j = number of training examples in that class.

    Returns ``{"auc": (mean, std), "recall": (mean, std)}`` over the m test examples (std with ddof=0).
    Raises ``ValueError`` when a test example's class has no training example, or when every training
    example is of that class (the AUC is then undefined).
    """
    S = _scores(scores, "scores", ndim=2)
    m, n = S.shape
    tr = _to_numpy(train_labels, "train_labels")
    te = _to_numpy(test_labels, "test_labels")
    if tr.ndim != 1 or tr.shape[0] != n:
        raise ValueError(f"train_labels: expected shape ({n},) to match scores {S.shape}, got {tr.shape}")
    if te.ndim != 1 or te.shape[0] != m:
        raise ValueError(f"test_labels: expected shape ({m},) to match scores {S.shape}, got {te.shape}")
    classes, tr_idx = np.unique(tr, return_inverse=True)
    if classes.shape[0] < 2:
        raise ValueError(f"train_labels: a single class ({classes[0]!r}); class detection needs at least two")
    aucs = np.empty(m)
    recalls = np.empty(m)
    for j in range(m):
        same = tr == te[j]
        k = int(same.sum())
        if k == 0:
            raise ValueError(f"test_labels: test example {j} has class {te[j]!r}, which no training example has")
        row = -S[j]  # most helpful = highest
        aucs[j] = _auc(row, same)
        recalls[j] = _expected_hits_lowest(S[j], same, k) / k
    return {
        "auc": (float(aucs.mean()), float(aucs.std())),
        "recall": (float(recalls.mean()), float(recalls.std())),
    }


# ----------------------------------------------------------------------------------- agreement
def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    if den == 0.0:
        warnings.warn("agreement: an input is constant; its correlation is undefined (nan)", stacklevel=3)
        return float("nan")
    return float(np.clip((a @ b) / den, -1.0, 1.0))


def agreement(scores: Any, reference: Any) -> dict[str, float]:
    """Pearson and Spearman correlation between two score arrays of the same shape (flattened).

    Used to compare an estimator with ``exact`` on the same gradients (METHODS.md §9). Spearman is the
    Pearson correlation of average ranks. A constant input gives ``nan`` (with a warning).
    """
    a = _to_numpy(scores, "scores")
    b = _to_numpy(reference, "reference")
    if a.shape != b.shape and a.squeeze().shape != b.squeeze().shape:
        raise ValueError(f"agreement: scores have shape {a.shape} but reference has shape {b.shape}")
    a = _scores(a.reshape(-1), "scores")
    b = _scores(b.reshape(-1), "reference")
    if a.shape[0] < 2:
        raise ValueError("agreement: needs at least two values")
    return {"pearson": _pearson(a, b), "spearman": _pearson(rank_average(a), rank_average(b))}


# ----------------------------------------------------------------------------------- LDS
def _column_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of a[:, j] with b[:, j] for every column j (nan where either is constant)."""
    out = np.full(a.shape[1], np.nan)
    for j in range(a.shape[1]):
        ra, rb = rank_average(a[:, j]), rank_average(b[:, j])
        ra -= ra.mean()
        rb -= rb.mean()
        den = math.sqrt(float(ra @ ra) * float(rb @ rb))
        if den > 0.0:
            out[j] = float(np.clip((ra @ rb) / den, -1.0, 1.0))
    return out


def lds(scores: Any, subsets: Any, losses: Any) -> tuple[float, np.ndarray]:
    """Linear datamodeling score (METHODS.md §9) of influence ``scores`` against retrained models.

    For test example j, the Spearman correlation over the S subsets between the predicted effect
    Σ_{i ∈ subset s} scores[j, i] and the measured test loss ``losses[s, j]`` of the model retrained
    on subset s; LDS = the mean over j. Positive = harmful, so a good method has a positive LDS.

    Args:
        scores: (m, n) influence of training example i on test example j; or (n,) aggregated
            scores (the influence on the mean test loss), compared with ``losses`` (S,) or, when
            ``losses`` is (S, m), with its mean over the test examples (the mean test loss).
        subsets: (S, n) booleans (or 0/1): subsets[s, i] = training example i was in subset s.
        losses: (S, m) test losses of the retrained models (or (S,) with (n,) scores).

    Returns:
        ``(mean, per_test)``: per_test holds one correlation per test example ((1,) for (n,) scores);
        a test example whose losses or predictions are constant over the subsets has no rank
        correlation: it is nan in per_test, left out of the mean, and a warning says how many.
        The mean is nan (with the warning) when every test example is left out.

    Raises:
        ValueError: shapes that do not match, fewer than 3 subsets, non-finite values, or subsets
            that are not booleans.
    """
    sc = _scores(scores, "scores", ndim=None)
    if sc.ndim not in (1, 2):
        raise ValueError(f"lds: scores must be (m, n) or (n,), got shape {sc.shape}")
    sub = _to_numpy(subsets, "subsets")
    if sub.ndim != 2:
        raise ValueError(f"lds: subsets must be (S, n) booleans, got shape {sub.shape}")
    if sub.dtype != np.bool_:
        if not np.issubdtype(sub.dtype, np.number) or not np.isin(np.unique(sub), [0, 1]).all():
            raise ValueError(f"lds: subsets must be booleans or 0/1, got dtype {sub.dtype}")
    n = sc.shape[-1]
    if sub.shape[1] != n:
        raise ValueError(
            f"lds: subsets {sub.shape} cover {sub.shape[1]} training examples but scores {sc.shape} have {n}"
        )
    S = sub.shape[0]
    if S < 3:
        raise ValueError(f"lds: needs at least 3 subsets for a rank correlation, got subsets {sub.shape}")
    L = _scores(losses, "losses", ndim=None)
    if sc.ndim == 1:
        if L.ndim == 2:
            L = L.mean(axis=1)
        if L.shape != (S,):
            raise ValueError(f"lds: with scores {sc.shape}, losses must be ({S},) or ({S}, m), got {L.shape}")
        L, sc = L[:, None], sc[None, :]
    elif L.shape != (S, sc.shape[0]):
        want = (S, sc.shape[0])
        raise ValueError(f"lds: with scores {sc.shape} and subsets {sub.shape}, losses must be {want}, got {L.shape}")
    pred = sub.astype(np.float64) @ sc.T  # (S, m): Σ_{i ∈ s} I(i, j)
    per_test = _column_spearman(pred, L)
    bad = int(np.isnan(per_test).sum())
    if bad:
        warnings.warn(
            f"lds: {bad} of {per_test.shape[0]} test example(s) have constant losses or predictions over the "
            f"{S} subsets; left out of the mean",
            stacklevel=2,
        )
    mean = float(np.nanmean(per_test)) if bad < per_test.shape[0] else float("nan")
    return mean, per_test


def bootstrap_ci(values: Any, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (1-D; nan entries dropped).

    Resamples the values with replacement ``n_boot`` times (``numpy.random.default_rng(seed)``, so
    the same call gives the same interval) and returns the ((1 − level)/2, (1 + level)/2) quantiles
    of the resampled means. For LDS, pass ``per_test`` (an interval over test examples; it does not
    include the noise of the retrained models' subsets); for a paired comparison of two methods,
    pass the difference of their per-test values.

    Raises:
        ValueError: no finite value, ``values`` not 1-D, ``level`` outside (0, 1) or ``n_boot`` < 1.
    """
    a = _to_numpy(values, "values").astype(np.float64)
    if a.ndim != 1:
        raise ValueError(f"bootstrap_ci: values must be 1-D, got shape {a.shape}")
    a = a[np.isfinite(a)]
    if a.size == 0:
        raise ValueError("bootstrap_ci: no finite values")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_ci: level must be in (0, 1), got {level}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"bootstrap_ci: n_boot must be a positive int, got {n_boot!r}")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, 256):  # bounded memory: 256 resamples at a time
        k = min(256, n_boot - start)
        means[start : start + k] = a[rng.integers(0, a.size, (k, a.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
