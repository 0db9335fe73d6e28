"""fastinf.eval: metrics against independent brute-force computations, and the synthetic task."""

import math

import numpy as np
import pytest
import torch

from fastinf.eval import (
    agreement,
    class_detection,
    detection_curve,
    mislabel_auc,
    mislabel_task,
    rank_average,
    roc_auc,
)


def pairwise_auc(scores, labels):
    """P(score of a positive > score of a negative) + ½ P(tie), by enumerating all pairs."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=bool)
    pos, neg = s[y], s[~y]
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


def random_case(seed, n=60, levels=7):
    """Scores with many ties (few distinct values) and random binary labels with both classes."""
    rng = np.random.default_rng(seed)
    s = rng.integers(0, levels, n).astype(float)
    y = rng.random(n) < 0.3
    y[0], y[1] = True, False
    return s, y


# --------------------------------------------------------------------------------------- ranks / AUC
@pytest.mark.parametrize("seed", range(5))
def test_rank_average_matches_counting_definition(seed):
    s, _ = random_case(seed)
    expected = np.array([(s < v).sum() + ((s == v).sum() + 1) / 2 for v in s])
    np.testing.assert_allclose(rank_average(s), expected)


@pytest.mark.parametrize("seed", range(8))
def test_auc_equals_pairwise_definition_with_ties(seed):
    s, y = random_case(seed)
    assert len(np.unique(s)) < len(s)  # the case really has ties
    assert mislabel_auc(s, y) == pytest.approx(pairwise_auc(s, y), abs=1e-12)
    assert roc_auc(y, s) == pytest.approx(pairwise_auc(s, y), abs=1e-12)


def test_auc_perfect_reversed_and_constant():
    y = np.array([0, 0, 1, 0, 1, 1, 0, 0], dtype=bool)
    perfect = y.astype(float) + 0.01 * np.arange(8)  # every positive above every negative
    assert mislabel_auc(perfect, y) == 1.0
    assert mislabel_auc(-perfect, y) == 0.0
    assert mislabel_auc(np.zeros(8), y) == 0.5


def test_auc_accepts_tensors_and_01_labels_and_is_rank_invariant():
    s, y = random_case(3)
    ref = mislabel_auc(s, y)
    assert mislabel_auc(torch.tensor(s, dtype=torch.float32), torch.tensor(y)) == pytest.approx(ref)
    assert mislabel_auc(list(s), y.astype(int)) == pytest.approx(ref)
    assert mislabel_auc(np.exp(s) * 3 + 1, y) == pytest.approx(ref)  # strictly increasing map
    assert mislabel_auc(-s, y) == pytest.approx(1 - ref)


@pytest.mark.parametrize(
    ("scores", "labels", "match"),
    [
        (np.zeros(5), np.array([0, 1, 0, 1]), "has 4 entries"),
        (np.array([0.1, np.nan, 0.3]), np.array([0, 1, 1]), "non-finite"),
        (np.array([0.1, np.inf, 0.3]), np.array([0, 1, 1]), "non-finite"),
        (np.array([0.1, 0.2, 0.3]), np.array([1, 1, 1]), "both classes"),
        (np.array([0.1, 0.2, 0.3]), np.array([0, 0, 0]), "both classes"),
        (np.array([0.1, 0.2, 0.3]), np.array([0, 2, 1]), "0/1"),
        (np.zeros((2, 3)), np.array([0, 1, 0]), "shape"),
    ],
)
def test_auc_errors(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        mislabel_auc(scores, labels)


# --------------------------------------------------------------------------------------- detection curve
@pytest.mark.parametrize("seed", range(5))
def test_detection_curve_endpoints_monotone_and_area(seed):
    s, y = random_case(seed)
    x, f = detection_curve(s, y)
    n, p = len(s), y.mean()
    assert x.shape == f.shape == (n + 1,)
    assert (x[0], f[0]) == (0.0, 0.0) and x[-1] == pytest.approx(1.0) and f[-1] == pytest.approx(1.0)
    assert np.all(np.diff(x) > 0) and np.all(np.diff(f) >= -1e-15)
    # the area under the gain curve is p/2 + (1 - p)·AUC, ties included (independent identity)
    area = float(np.sum((f[1:] + f[:-1]) / 2 * np.diff(x)))
    assert area == pytest.approx(p / 2 + (1 - p) * pairwise_auc(s, y), abs=1e-12)


def test_detection_curve_matches_counting_without_ties():
    rng = np.random.default_rng(0)
    s = rng.normal(size=40)
    y = rng.random(40) < 0.25
    x, f = detection_curve(torch.tensor(s), torch.tensor(y))
    order = np.argsort(-s)
    for k in range(41):
        assert f[k] == pytest.approx(y[order[:k]].sum() / y.sum())
        assert x[k] == pytest.approx(k / 40)


def test_detection_curve_perfect_and_all_tied():
    y = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 0], dtype=bool)
    x, f = detection_curve(y.astype(float), y)
    assert f[2] == 1.0 and f[1] == 0.5  # both flipped examples in the first two inspected
    x, f = detection_curve(np.ones(10), y)
    np.testing.assert_allclose(f, x)  # a random order finds flipped examples at the base rate
    with pytest.raises(ValueError, match="no flipped"):
        detection_curve(np.ones(10), np.zeros(10, dtype=bool))


# --------------------------------------------------------------------------------------- class detection
def test_class_detection_hand_computed_case():
    scores = np.array([[-3.0, 1.0, -2.0, 2.0]])
    # −scores = [3, −1, 2, −2]; same class = {0, 1}: pairs (3>2, 3>−2, −1<2, −1>−2) → AUC 3/4;
    # the 2 lowest scores are examples 0 (same) and 2 (other) → recall 1/2
    out = class_detection(scores, np.array([0, 0, 1, 1]), np.array([0]))
    assert out["auc"] == pytest.approx((0.75, 0.0))
    assert out["recall"] == pytest.approx((0.5, 0.0))


def test_class_detection_perfect_and_reversed():
    train = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    test = np.array([2, 0, 1, 1])
    same = (train[None, :] == test[:, None]).astype(float)
    helpful = -same - 0.01 * np.arange(10)  # same-class examples most helpful (lowest score)
    out = class_detection(torch.tensor(helpful), torch.tensor(train), torch.tensor(test))
    assert out == {"auc": (1.0, 0.0), "recall": (1.0, 0.0)}
    out = class_detection(-helpful, train, test)
    assert out == {"auc": (0.0, 0.0), "recall": (0.0, 0.0)}


@pytest.mark.parametrize("seed", range(3))
def test_class_detection_matches_per_row_brute_force(seed):
    rng = np.random.default_rng(seed)
    m, n = 6, 30
    train = rng.integers(0, 3, n)
    train[:3] = [0, 1, 2]
    test = rng.integers(0, 3, m)
    S = rng.normal(size=(m, n))
    aucs, recalls = [], []
    for j in range(m):
        same = train == test[j]
        aucs.append(pairwise_auc(-S[j], same))
        k = same.sum()
        recalls.append(same[np.argsort(S[j])[:k]].mean())
    out = class_detection(S, train, test)
    assert out["auc"] == pytest.approx((np.mean(aucs), np.std(aucs)))
    assert out["recall"] == pytest.approx((np.mean(recalls), np.std(recalls)))


def test_class_detection_recall_splits_boundary_ties():
    # k = 2 same-class examples; lowest score −1 (other class) then a 3-way tie at 0 with 2 same-class
    out = class_detection(np.array([[-1.0, 0.0, 0.0, 0.0, 5.0]]), np.array([1, 0, 0, 1, 1]), np.array([0]))
    assert out["recall"][0] == pytest.approx((1 * 2 / 3) / 2)


def test_class_detection_errors():
    S = np.zeros((2, 4))
    with pytest.raises(ValueError, match="no training example"):
        class_detection(S, np.array([0, 0, 1, 1]), np.array([0, 5]))
    with pytest.raises(ValueError, match="single class"):
        class_detection(S, np.array([0, 0, 0, 0]), np.array([0, 0]))
    with pytest.raises(ValueError, match="train_labels"):
        class_detection(S, np.array([0, 1, 1]), np.array([0, 1]))
    with pytest.raises(ValueError, match="test_labels"):
        class_detection(S, np.array([0, 1, 1, 0]), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="non-finite"):
        class_detection(np.full((2, 4), np.nan), np.array([0, 1, 1, 0]), np.array([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        class_detection(np.zeros(4), np.array([0, 1, 1, 0]), np.array([0]))


# --------------------------------------------------------------------------------------- agreement
def test_agreement_self_negation_and_monotone_map():
    x = torch.randn(7, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert agreement(x, x) == pytest.approx({"pearson": 1.0, "spearman": 1.0})
    assert agreement(x, -x) == pytest.approx({"pearson": -1.0, "spearman": -1.0})
    out = agreement(torch.exp(3 * x), x)
    assert out["spearman"] == pytest.approx(1.0) and out["pearson"] < 0.95


def test_agreement_matches_numpy_and_flattens():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5, 8))
    b = a + rng.normal(size=(5, 8))
    out = agreement(a, b)
    assert out["pearson"] == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    ra, rb = rank_average(a.ravel()), rank_average(b.ravel())
    assert out["spearman"] == pytest.approx(np.corrcoef(ra, rb)[0, 1])
    assert agreement(a.ravel()[None, :], b.ravel()) == pytest.approx(out)  # (1, n) vs (n,)


def test_agreement_errors_and_constant():
    with pytest.raises(ValueError, match="shape"):
        agreement(np.zeros((3, 4)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        agreement(np.array([1.0, np.nan, 2.0]), np.array([1.0, 2.0, 3.0]))
    with pytest.warns(UserWarning, match="constant"):
        out = agreement(np.ones(4), np.arange(4.0))
    assert math.isnan(out["pearson"]) and math.isnan(out["spearman"])


# --------------------------------------------------------------------------------------- synthetic task
@pytest.fixture(scope="module")
def task():
    return mislabel_task(120, 30, seed=3, steps=100)


def test_synthetic_task_shapes_labels_and_determinism(task):
    train, test, flipped = task
    assert train.n == 120 and test.n == 30 and train.names == test.names
    assert train.dims == {"hidden.lora_A": 4 * 16, "hidden.lora_B": 32 * 4, "out.lora_A": 4 * 32, "out.lora_B": 2 * 4}
    assert flipped.dtype == torch.bool and int(flipped.sum()) == 24
    assert torch.equal(task.train_labels != task.true_train_labels, flipped)
    again = mislabel_task(120, 30, seed=3, steps=100)
    for k in train.names:
        assert torch.equal(again.train[k], train[k]) and torch.equal(again.test[k], test[k])
    assert torch.equal(again.is_flipped, flipped)
    other = mislabel_task(120, 30, seed=4, steps=100)
    assert not torch.equal(other.is_flipped, flipped)
    assert task.info["final_train_loss"] < math.log(2)  # training did something


def test_synthetic_per_example_gradients_match_autograd(task):
    params = {k: v.clone().requires_grad_(True) for k, v in task.params.items()}
    for i in (0, 7, 119):
        loss = task.loss_fn(params, task.x_train[i : i + 1], task.train_labels[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, list(params.values()))
        for k, g in zip(params, grads, strict=True):
            torch.testing.assert_close(task.train[k][i], g.reshape(-1), rtol=1e-5, atol=1e-7)
    j = 5
    loss = task.loss_fn(params, task.x_test[j : j + 1], task.test_labels[j : j + 1]).sum()
    for k, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
        torch.testing.assert_close(task.test[k][j], g.reshape(-1), rtol=1e-5, atol=1e-7)


def test_synthetic_task_rejects_bad_arguments():
    with pytest.raises(ValueError, match="flip"):
        mislabel_task(2, 5)
    with pytest.raises(ValueError, match="n_test"):
        mislabel_task(50, 0)
    with pytest.raises(ValueError, match="flip"):
        mislabel_task(50, 5, flip=1.5)
