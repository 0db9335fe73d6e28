"""Z0-Inf: the GEMM form against the explicit finite-difference form in parameter space (float64)."""

import math

import numpy as np
import pytest
import torch

import fastinf
from fastinf import LossTrace, Z0Inf
from fastinf.estimators.z0inf import neighbor_sets, spearman_matrix


def _run(T=9, D=6, n=7, m=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.cumsum(torch.randn(T, D, generator=g, dtype=torch.float64), 0)  # a training path
    Ltr = torch.randn(T, n, generator=g, dtype=torch.float64)
    Lte = torch.randn(T, m, generator=g, dtype=torch.float64)
    return theta, Ltr, Lte


def _explicit(theta, Ltr, Lte, K, window, center, normalization="consistent"):
    """Z (n, m) from finite-difference gradients computed in parameter space."""
    T = theta.shape[0]
    if center:
        Ltr = Ltr - Ltr.mean(1, keepdim=True)
        Lte = Lte - Lte.mean(1, keepdim=True)
    Z = torch.zeros(Ltr.shape[1], Lte.shape[1], dtype=torch.float64)
    for t in range(T):
        if window == "window":
            nb = sorted(sorted((s for s in range(T) if s != t), key=lambda s: (abs(s - t), s))[:K])
        else:
            nb = [s for s in range(T - K // 2, T) if s != t]
        if not nb:
            continue
        if normalization == "consistent":
            gtr = sum(
                torch.outer(Ltr[t] - Ltr[s], (theta[t] - theta[s]) / (theta[t] - theta[s]).pow(2).sum()) for s in nb
            )
            gte = sum(
                torch.outer(Lte[t] - Lte[s], (theta[t] - theta[s]) / (theta[t] - theta[s]).pow(2).sum()) for s in nb
            )
            Z += (gtr / len(nb)) @ (gte / len(nb)).T
        else:  # the reference code's double division, no 1/K
            for s in nb:
                for s2 in nb:
                    Ns, Ns2 = (theta[t] - theta[s]).pow(2).sum(), (theta[t] - theta[s2]).pow(2).sum()
                    coef = (theta[t] - theta[s]) @ (theta[t] - theta[s2]) / (Ns * Ns2) / (Ns * Ns2)
                    Z += coef * torch.outer(Ltr[t] - Ltr[s], Lte[t] - Lte[s2])
    return Z / T


@pytest.mark.parametrize("window", ["window", "tail"])
@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("normalization", ["consistent", "reference"])
def test_gemm_form_equals_parameter_space_finite_differences(window, center, normalization):
    theta, Ltr, Lte = _run()
    gram = theta @ theta.T
    est = Z0Inf(window=window, center_losses=center, weight_by_correlation=False, normalization=normalization)
    got = est.fit(LossTrace(Ltr, gram)).score(LossTrace(Lte))
    ref = -_explicit(theta, Ltr, Lte, 4, window, center, normalization).T
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    assert got.shape == (4, 7)


def test_spearman_weighting_matches_scipy_definition():
    theta, Ltr, Lte = _run(seed=1)
    Ltr[:, 2] = Ltr[0, 2]  # a constant trajectory: weight 0
    Ltr[3, 1] = Ltr[5, 1]  # a tie
    gram = theta @ theta.T
    plain = Z0Inf(weight_by_correlation=False).fit(LossTrace(Ltr, gram)).score(LossTrace(Lte))
    weighted = Z0Inf().fit(LossTrace(Ltr, gram)).score(LossTrace(Lte))

    def rank(v):  # average ranks, as scipy.stats.rankdata
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(1, len(v) + 1)
        for val in np.unique(v):
            r[v == val] = r[v == val].mean()
        return r

    rho = np.zeros((Lte.shape[1], Ltr.shape[1]))
    for j in range(Lte.shape[1]):
        for i in range(Ltr.shape[1]):
            a, b = rank(Ltr[:, i].numpy()), rank(Lte[:, j].numpy())
            rho[j, i] = 0.0 if a.std() == 0 else np.corrcoef(a, b)[0, 1]
    torch.testing.assert_close(weighted, plain * torch.from_numpy(rho), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(spearman_matrix(Ltr, Lte), torch.from_numpy(rho), rtol=1e-12, atol=1e-12)


def test_window_neighbour_sets_at_the_ends():
    nb = neighbor_sets(8, 4, "window")
    assert nb[0] == [1, 2, 3, 4]
    assert nb[7] == [3, 4, 5, 6]
    assert nb[1] == [0, 2, 3, 4]  # distances 1, 1, 2, 3
    assert nb[4] == [2, 3, 5, 6]
    assert neighbor_sets(8, 3, "window")[4] == [2, 3, 5]  # 2 and 6 tie at distance 2 → the smaller index
    assert neighbor_sets(8, 4, "tail")[7] == [6]
    assert neighbor_sets(8, 4, "tail")[0] == [6, 7]


def test_self_influence_fd_and_var():
    theta, Ltr, _ = _run(seed=2)
    gram = theta @ theta.T
    est = Z0Inf(weight_by_correlation=False, center_losses=False).fit(LossTrace(Ltr, gram))
    T = theta.shape[0]
    fd = torch.zeros(Ltr.shape[1], dtype=torch.float64)
    for t in range(T):
        nb = sorted(sorted((s for s in range(T) if s != t), key=lambda s: (abs(s - t), s))[:4])
        g = (
            sum(torch.outer(Ltr[t] - Ltr[s], (theta[t] - theta[s]) / (theta[t] - theta[s]).pow(2).sum()) for s in nb)
            / 4
        )
        fd += g.pow(2).sum(1)
    torch.testing.assert_close(est.self_influence("fd"), -fd)
    torch.testing.assert_close(est.self_influence("var"), -torch.from_numpy(np.var(Ltr.numpy(), axis=0, ddof=1)))
    # fd self-influence is the diagonal of train-on-train (correlation weight of a trace with itself is 1)
    full = Z0Inf(center_losses=False).fit(LossTrace(Ltr, gram))
    torch.testing.assert_close(torch.diagonal(full.score(LossTrace(Ltr))) * T, full.self_influence("fd"))


def _reference_self_influence_port(theta, L, K):
    """Independent port of the reference's finite-difference self-influence (facebookresearch/z0inf,
    ``z_self_inf_finite_diff``), in parameter space: for every checkpoint t, the neighbours are
    range(T − K//2, T) without t; ĝ = Σ_s (L[s] − L[t]) (θ_s − θ_t) / ‖θ_s − θ_t‖², divided by K; the score
    sums ‖ĝ‖² over t. Raw losses, no 1/T."""
    T, n = L.shape
    out = torch.zeros(n, dtype=torch.float64)
    for t in range(T):
        g = torch.zeros(n, theta.shape[1], dtype=torch.float64)
        for s in range(max(0, T - K // 2), min(T, T + K // 2)):
            if s == t:
                continue
            w = theta[s] - theta[t]
            g += torch.outer(L[s] - L[t], w / (w @ w))
        out += (g / K).pow(2).sum(1)
    return out


@pytest.mark.parametrize("K", [4, 6])
@pytest.mark.parametrize("window", ["window", "tail"])
def test_self_influence_reference_kind_is_the_reference_formula(K, window):
    """kind="reference" follows the reference code whatever the estimator's window, centring and
    normalisation options (which it documents), and is negated like every fastinf score."""
    theta, Ltr, _ = _run(T=10, seed=6)
    Ltr = Ltr + torch.linspace(0, 3, 10, dtype=torch.float64)[:, None]  # a loss level that changes with t
    gram = theta @ theta.T
    want = -_reference_self_influence_port(theta, Ltr, K)
    for normalization in ("consistent", "reference"):
        est = Z0Inf(neighbors=K, window=window, normalization=normalization).fit(LossTrace(Ltr, gram))
        torch.testing.assert_close(est.self_influence("reference"), want, rtol=1e-10, atol=0)
    # centring matters for "fd" (the documented default mode), not for "reference"
    fd = Z0Inf(neighbors=K, window="tail", normalization="consistent").fit(LossTrace(Ltr, gram))
    assert not torch.allclose(fd.self_influence("fd"), want, rtol=1e-3)


def test_topk_and_reduce_and_registry():
    theta, Ltr, Lte = _run(seed=3)
    est = fastinf.get_estimator("z0inf").fit(LossTrace(Ltr, theta @ theta.T))
    full = est.score(LossTrace(Lte))
    v, i = est.topk(LossTrace(Lte), 3, largest=False)
    rv, ri = torch.topk(full, 3, dim=1, largest=False)
    assert torch.equal(i, ri)
    torch.testing.assert_close(est.score(LossTrace(Lte), reduce="mean"), full.mean(0))
    assert "z0inf" in fastinf.available_methods() and "bif" in fastinf.available_methods()


def test_bad_input():
    theta, Ltr, Lte = _run(seed=4)
    gram = theta @ theta.T
    with pytest.raises(ValueError, match="Gram"):
        Z0Inf().fit(LossTrace(Ltr))
    with pytest.raises(ValueError, match=r"\(T, T\)"):
        LossTrace(Ltr, gram[:-1, :-1])
    with pytest.raises(ValueError, match="positive semi-definite"):
        LossTrace(Ltr, -gram)
    with pytest.raises(ValueError, match="symmetric"):
        LossTrace(Ltr, gram + torch.triu(torch.ones_like(gram)))
    with pytest.raises(ValueError, match="T ≥ K"):
        Z0Inf(neighbors=9).fit(LossTrace(Ltr, gram))
    bad = Ltr.clone()
    bad[2, 3] = math.nan
    with pytest.raises(ValueError, match="checkpoint/draw 2, example 3"):
        LossTrace(bad, gram)
    est = Z0Inf().fit(LossTrace(Ltr, gram))
    with pytest.raises(ValueError, match="T = 8"):
        est.score(LossTrace(Lte[:-1]))
    dup = theta.clone()
    dup[4] = dup[3]
    with pytest.raises(ValueError, match="identical"):
        Z0Inf().fit(LossTrace(Ltr, dup @ dup.T))
    with pytest.raises(ValueError, match="window"):
        Z0Inf(window="all")
    with pytest.raises(ValueError, match="kind"):
        est.self_influence("exact")


def test_abs_correlation_weighting_keeps_the_sign_of_z():
    theta, Ltr, Lte = _run(seed=5)
    gram = theta @ theta.T
    plain = Z0Inf(weight_by_correlation=False).fit(LossTrace(Ltr, gram)).score(LossTrace(Lte))
    absw = Z0Inf(weight_by_correlation="abs").fit(LossTrace(Ltr, gram)).score(LossTrace(Lte))
    signed = Z0Inf().fit(LossTrace(Ltr, gram)).score(LossTrace(Lte))
    rho = spearman_matrix(Ltr, Lte)
    torch.testing.assert_close(absw, plain * rho.abs())
    torch.testing.assert_close(signed, plain * rho)
    assert bool(((absw * plain) >= 0).all())
    with pytest.raises(ValueError, match="weight_by_correlation"):
        Z0Inf(weight_by_correlation="yes")
