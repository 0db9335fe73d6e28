"""The linear datamodeling score (METHODS.md §9): ``fastinf.eval.lds`` against scipy's Spearman,
its invariances, ``bootstrap_ci``, and the ``fastinf eval lds`` experiment end to end on a tiny model."""

import warnings

import numpy as np
import pytest

from fastinf.eval import bootstrap_ci, lds

scipy_stats = pytest.importorskip("scipy.stats")


def case(seed, S=40, n=30, m=7, noise=1.0):
    """Random half-subsets, scores and losses that follow the scores' datamodel plus noise (ties included)."""
    rng = np.random.default_rng(seed)
    subsets = np.zeros((S, n), dtype=bool)
    for s in range(S):
        subsets[s, rng.choice(n, n // 2, replace=False)] = True
    scores = rng.normal(size=(m, n))
    losses = subsets @ scores.T + noise * rng.normal(size=(S, m))
    losses[:5, 0] = losses[0, 0]  # ties in one column
    return scores, subsets, losses


@pytest.mark.parametrize("seed", range(4))
def test_lds_matches_a_scipy_spearman_loop(seed):
    scores, subsets, losses = case(seed)
    mean, per_test = lds(scores, subsets, losses)
    pred = subsets.astype(float) @ scores.T
    want = np.array([scipy_stats.spearmanr(pred[:, j], losses[:, j])[0] for j in range(scores.shape[0])])
    np.testing.assert_allclose(per_test, want, rtol=0, atol=1e-12)
    assert mean == pytest.approx(want.mean(), abs=1e-12)
    assert 0.2 < mean < 1.0  # a datamodel with noise: clearly positive, not perfect


def test_a_perfect_linear_datamodel_scores_one_and_negation_flips_the_sign():
    scores, subsets, _ = case(1)
    losses = 3.0 + 0.5 * (subsets @ scores.T)  # exactly linear in the subset indicators
    mean, per_test = lds(scores, subsets, losses)
    np.testing.assert_allclose(per_test, 1.0, atol=1e-12)
    noisy = case(2)[2]
    m1, p1 = lds(scores, subsets, noisy)
    m2, p2 = lds(-scores, subsets, noisy)
    assert m2 == pytest.approx(-m1, abs=1e-12)
    np.testing.assert_allclose(p2, -p1, atol=1e-12)


def test_lds_is_invariant_to_the_training_order_and_monotone_losses():
    scores, subsets, losses = case(3)
    perm = np.random.default_rng(0).permutation(scores.shape[1])
    m0, p0 = lds(scores, subsets, losses)
    m1, p1 = lds(scores[:, perm], subsets[:, perm], losses)
    np.testing.assert_allclose(p1, p0, atol=1e-12)
    m2, p2 = lds(scores, subsets, np.exp(losses / 10))  # ranks only: a monotone map changes nothing
    np.testing.assert_allclose(p2, p0, atol=1e-12)
    m3, _ = lds(scores * 1e-6, subsets.astype(int), losses)  # scale and 0/1 subsets
    assert m3 == pytest.approx(m0, abs=1e-12)


def test_aggregated_scores_use_the_mean_test_loss():
    scores, subsets, losses = case(4)
    agg = scores.mean(0)
    mean, per_test = lds(agg, subsets, losses)
    want = scipy_stats.spearmanr(subsets @ agg, losses.mean(1))[0]
    assert per_test.shape == (1,)
    assert mean == pytest.approx(want, abs=1e-12)
    assert lds(agg, subsets, losses.mean(1))[0] == pytest.approx(want, abs=1e-12)


def test_constant_columns_are_left_out_with_a_count():
    scores, subsets, losses = case(5)
    losses[:, 2] = 1.5  # constant losses
    scores[4] = 0.0  # constant predictions
    with pytest.warns(UserWarning, match=r"2 of 7 test example"):
        mean, per_test = lds(scores, subsets, losses)
    assert np.isnan(per_test[[2, 4]]).all() and np.isfinite(np.delete(per_test, [2, 4])).all()
    assert mean == pytest.approx(np.delete(per_test, [2, 4]).mean(), abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isnan(lds(scores, subsets, np.ones_like(losses))[0])


@pytest.mark.parametrize(
    "args, match",
    [
        ((np.zeros((3, 10)), np.zeros((5, 9), bool), np.zeros((5, 3))), r"subsets \(5, 9\).*scores \(3, 10\)"),
        ((np.zeros((3, 10)), np.zeros((5, 10), bool), np.zeros((5, 4))), r"losses must be \(5, 3\), got \(5, 4\)"),
        ((np.zeros((3, 10)), np.zeros((2, 10), bool), np.zeros((2, 3))), "at least 3 subsets"),
        ((np.zeros((3, 10)), np.full((5, 10), 2), np.zeros((5, 3))), "booleans or 0/1"),
        ((np.zeros(10), np.zeros((5, 10), bool), np.zeros(4)), r"losses must be \(5,\) or \(5, m\)"),
        ((np.zeros((2, 3, 10)), np.zeros((5, 10), bool), np.zeros((5, 3))), r"scores must be \(m, n\) or \(n,\)"),
        ((np.zeros((3, 10)), np.zeros(10, bool), np.zeros((5, 3))), r"subsets must be \(S, n\)"),
        ((np.zeros((3, 10)), np.zeros((5, 10), bool), np.full((5, 3), np.nan)), "losses: 15 non-finite"),
    ],
)
def test_lds_rejects_bad_shapes_in_one_line(args, match):
    with pytest.raises(ValueError, match=match) as e:
        lds(*args)
    assert "\n" not in str(e.value)


def test_bootstrap_ci_is_seeded_and_has_the_normal_width():
    rng = np.random.default_rng(0)
    x = rng.normal(0.3, 1.0, 400)
    lo, hi = bootstrap_ci(x, seed=3)
    assert (lo, hi) == bootstrap_ci(x, seed=3)
    assert (lo, hi) != bootstrap_ci(x, seed=4)
    assert lo < x.mean() < hi
    # the normal-theory 95 % width 2 · 1.96 · sd / √n, within 15 % (a wrong level or √n would miss it)
    assert hi - lo == pytest.approx(2 * 1.96 * x.std() / np.sqrt(x.size), rel=0.15)
    lo90, hi90 = bootstrap_ci(x, level=0.9, seed=3)
    assert hi90 - lo90 == pytest.approx(2 * 1.645 * x.std() / np.sqrt(x.size), rel=0.15)
    assert bootstrap_ci(np.array([0.2, np.nan, 0.2])) == (pytest.approx(0.2), pytest.approx(0.2))
    with pytest.raises(ValueError, match="no finite values"):
        bootstrap_ci([np.nan])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(x, level=1.5)
