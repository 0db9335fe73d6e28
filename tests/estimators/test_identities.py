"""METHODS.md §1–6 identities in float64 against independent formulas."""

import pytest
import torch
from conftest import auto_lambda, dense_inverse_scores, make_blocks

import fastinf
from fastinf import DataInf, DiagonalFisher, Exact, GradientSet, HessianFree, LiSSA, RRInf, RRInfFixedPoint

ATOL = 1e-9


def _close(a, b, rtol=1e-8):
    scale = max(float(b.abs().max()), 1e-300)
    assert float((a - b).abs().max()) <= rtol * scale, f"max diff {float((a - b).abs().max())} vs scale {scale}"


# ----------------------------------------------------------------------------------- Exact
@pytest.mark.parametrize("blockwise", [False, True])
def test_exact_matches_dense_solve_with_auto_damping(small_problem, blockwise):
    train, test = small_problem
    groups = [[k] for k in train.names] if blockwise else [train.names]
    lam = {tuple(g): auto_lambda(train, g) for g in groups}
    ref = dense_inverse_scores(train, test, lam, groups)
    _close(Exact(blockwise=blockwise, damping="paper").fit(train).score(test), ref)


@pytest.mark.parametrize("blockwise", [False, True])
def test_exact_n_space_equals_d_space(blockwise):
    dims = {"a": 9, "b": 4, "c": 7}
    for n in (5, 30):  # both n < D and n > D
        train, test = make_blocks(n, dims, seed=n), make_blocks(3, dims, seed=n + 1)
        sn = Exact(solve="n", blockwise=blockwise).fit(train)
        sd = Exact(solve="d", blockwise=blockwise).fit(train)
        _close(sn.score(test), sd.score(test), 1e-7)
        _close(sn.self_influence(), sd.self_influence(), 1e-7)


def test_exact_auto_solve_picks_smaller_space():
    train = make_blocks(10, {"a": 40, "b": 3})
    est = Exact(blockwise=True).fit(train)
    assert est.solves_ == {("a",): "n", ("b",): "d"}
    assert Exact().fit(train).solves_ == {("a", "b"): "n"}


def test_exact_explicit_damping_is_absolute(small_problem):
    train, test = small_problem
    ref = dense_inverse_scores(train, test, 0.37, [train.names])
    _close(Exact(damping=0.37).fit(train).score(test), ref)


# ----------------------------------------------------------------------------------- DataInf
def _datainf_loop(train, test, lam_of):
    """Per-example, per-test loop of METHODS.md §3 (the reference engines' algorithm)."""
    n = train.n
    out = torch.zeros(test.n, n, dtype=torch.float64)
    for j in range(test.n):
        for k in train.names:
            lam = lam_of[k]
            t = test[k][j].double()
            h = torch.zeros_like(t)
            for i in range(n):
                g = train[k][i].double()
                h += (t - (g @ t) / (lam + g @ g) * g) / (n * lam)
            for i in range(n):
                out[j, i] -= h @ train[k][i].double()
    return out


def test_datainf_gram_equals_streaming_equals_loop(small_problem):
    train, test = small_problem
    lam_of = {k: auto_lambda(train, [k]) for k in train.names}
    ref = _datainf_loop(train, test, lam_of)
    gram = DataInf(form="gram").fit(train).score(test)
    stream = DataInf(form="streaming", chunk_size=4).fit(train).score(test)
    _close(gram, ref)
    _close(stream, ref)
    assert DataInf().fit(train).lambdas_ == pytest.approx(lam_of, rel=1e-12)


def test_datainf_equals_exact_when_n_is_one():
    dims = {"a": 5, "b": 8}
    train, test = make_blocks(1, dims, seed=3), make_blocks(6, dims, seed=4)
    for bw in (True, False):
        _close(
            DataInf(blockwise=bw).fit(train).score(test),
            Exact(blockwise=bw, damping="paper").fit(train).score(test),
            1e-9,
        )


@pytest.mark.parametrize("method", [DataInf, Exact])
def test_scale_invariance_with_default_damping(small_problem, method):
    train, test = small_problem
    c = 37.5
    scaled_tr = GradientSet({k: train[k] * c for k in train.names})
    scaled_te = GradientSet({k: test[k] * c for k in test.names})
    _close(method().fit(scaled_tr).score(scaled_te), method().fit(train).score(test), 1e-9)


def test_datainf_global_mode_is_one_group(small_problem):
    train, test = small_problem
    lam = auto_lambda(train, train.names)
    merged = GradientSet.from_matrix(train.matrix())
    ref = _datainf_loop(merged, GradientSet.from_matrix(test.matrix()), {"all": lam})
    _close(DataInf(blockwise=False).fit(train).score(test), ref)


# ----------------------------------------------------------------------------------- LiSSA
@pytest.mark.parametrize("blockwise", [True, False])
def test_lissa_converges_to_exact(small_problem, blockwise):
    train, test = small_problem
    exact = Exact(blockwise=blockwise).fit(train).score(test)
    est = LiSSA(blockwise=blockwise, damping_factor=1.0, depth=20000, tol=1e-13).fit(train)
    ref_big_damp = Exact(blockwise=blockwise, damping_factor=1.0).fit(train).score(test)
    got = est.score(test)
    assert est.converged_
    _close(got, ref_big_damp, 1e-6)
    assert not torch.allclose(got, exact)  # damping really changes the answer


def test_lissa_scale_estimate_bounds_spectrum(small_problem):
    train, _ = small_problem
    est = LiSSA(blockwise=True).fit(train)
    for k in train.names:
        X = train[k]
        top = float(torch.linalg.eigvalsh(X.T @ X / train.n).max())
        lam = est.lam_[(k,)]
        assert est.scale_[(k,)] > 0.5 * (top + lam)  # the recursion's convergence condition


def test_lissa_reference_compat_matches_reference_recursion(small_problem):
    train, test = small_problem
    n = train.n
    v = test.mean()
    score = torch.zeros(n, dtype=torch.float64)
    for k in train.names:
        lam = auto_lambda(train, [k])
        r = v[k][0].clone()
        for _ in range(10):
            tmp = torch.zeros_like(r)
            for i in range(n):
                g = train[k][i]
                tmp += ((g @ r) * g - lam * r) / n
            r = v[k][0] + r - tmp
        score -= train[k] @ r
    got = LiSSA(reference_compat=True).fit(train).score(test, reduce="mean")
    _close(got, score)


# ----------------------------------------------------------------------------------- simple ones
def test_hessian_free_and_diagonal_fisher_formulas(small_problem):
    train, test = small_problem
    X, T = train.matrix(), test.matrix()
    _close(HessianFree().fit(train).score(test), -T @ X.T)
    _close(HessianFree(normalize=True).fit(train).score(test), -T @ X.T / train.n)
    lam = auto_lambda(train, train.names)
    diag = X.pow(2).mean(0)
    _close(DiagonalFisher().fit(train).score(test), -(T / (diag + lam)) @ X.T)
    # block-wise λ_l
    lam_vec = torch.cat([torch.full((d,), auto_lambda(train, [k])) for k, d in train.dims.items()])
    _close(DiagonalFisher(blockwise=True).fit(train).score(test), -(T / (diag + lam_vec)) @ X.T)


# ----------------------------------------------------------------------------------- RRInf
def test_rrinf_first_step_is_normalised_projection(small_problem):
    train, test = small_problem
    n, lr = train.n, 0.01
    est = RRInf(iters=1, lr=lr, seed=5).fit(train)
    (coord,) = est.coords_.tolist()
    X, T = train.matrix(), test.matrix()
    phi = X[:, coord]
    ups = -n * T[:, coord]  # (m,)
    expected = 2 * lr * ups[:, None] * phi[None, :] / (phi @ phi)
    _close(est.score(test), expected, 1e-12)


def test_rrinf_is_seeded_and_seed_dependent(small_problem):
    train, test = small_problem
    a = RRInf(seed=1).fit(train).score(test, reduce="mean")
    b = RRInf(seed=1).fit(train).score(test, reduce="mean")
    c = RRInf(seed=2).fit(train).score(test, reduce="mean")
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_rrinf_with_decaying_step_approaches_fixed_point():
    dims = {"a": 7, "b": 5}
    train = make_blocks(4, dims, seed=11, scale=[1.0, 3.0])
    test = make_blocks(2, dims, seed=12, scale=[1.0, 3.0])
    fp = RRInfFixedPoint(damping=0.5).fit(train).score(test)
    ex = Exact(damping=0.5).fit(train).score(test)

    def err(iters, ref):
        sgd = RRInf(damping=0.5, lr=0.2, iters=iters, lr_decay=0.05, seed=0).fit(train).score(test)
        return float((sgd - ref).norm() / ref.norm())

    short, long = err(2000, fp), err(40000, fp)
    assert long < 0.04, long
    assert long < short / 3  # still improving with more iterations
    assert err(40000, ex) > 10 * long  # it converges to the weighted problem, not to the exact influence


def test_rrinf_minibatch_full_rows_is_gradient_descent_on_weighted_problem():
    dims = {"a": 6}
    train = make_blocks(3, dims, seed=21)
    test = make_blocks(2, dims, seed=22)
    fp = RRInfFixedPoint(damping=0.1).fit(train).score(test)
    sgd = RRInf(damping=0.1, lr=0.05, iters=30000, sampling="minibatch", batch_size=64, lr_decay=1e-3, seed=1)
    got = sgd.fit(train).score(test)
    assert float((got - fp).norm() / fp.norm()) < 0.03


def test_fixed_point_equals_exact_when_row_norms_equal():
    # columns of the (n, D) matrix (= rows φ_ι of Φ) all with squared norm c
    n, D, c = 6, 10, 4.0
    g = torch.Generator().manual_seed(3)
    X = torch.randn(n, D, generator=g, dtype=torch.float64)
    X = X / X.norm(dim=0, keepdim=True) * c**0.5
    train = GradientSet({"a": X[:, :4], "b": X[:, 4:]})
    test = make_blocks(3, {"a": 4, "b": 6}, seed=4)
    lam = 0.02
    # the weighted problem with W = I/c is the exact problem with damping c·λ
    _close(RRInfFixedPoint(damping=lam).fit(train).score(test), Exact(damping=c * lam).fit(train).score(test), 1e-8)
    unit = GradientSet({k: train[k] / c**0.5 for k in train.names})
    _close(RRInfFixedPoint().fit(unit).score(test), Exact(damping="paper").fit(unit).score(test), 1e-8)


def test_fixed_point_matches_weighted_ridge_formula(small_problem):
    train, test = small_problem
    n = train.n
    Phi = train.matrix().T  # (D, n)
    W = torch.diag(1.0 / Phi.pow(2).sum(1))
    lam = auto_lambda(train, train.names)
    Ups = -n * test.matrix().T  # (D, m)
    omega = torch.linalg.solve(Phi.T @ W @ Phi + n * lam * torch.eye(n, dtype=torch.float64), Phi.T @ W @ Ups)
    _close(RRInfFixedPoint().fit(train).score(test), omega.T)


# zero rows: tests/estimators/test_rrinf.py (convergence to the fixed point, step-by-step loop)


def test_rrinf_layer_mode_matches_loop():
    dims = {"a": 4, "b": 3}
    train, test = make_blocks(5, dims, seed=7), make_blocks(2, dims, seed=8)
    est = RRInf(sampling="layer", iters=30, lr=0.1, seed=3).fit(train)
    n, D = train.n, train.dim
    om = torch.zeros(n, 2, dtype=torch.float64)
    for bi in est.layer_draws_:
        k = train.names[bi]
        Phi = train[k].T  # (d_l, n)
        ups = -n * test[k].T  # (d_l, m)
        E = (Phi @ om - ups) / Phi.pow(2).sum(1, keepdim=True)
        lam_l = auto_lambda(train, [k])
        om = om - 0.1 * (2 * Phi.T @ E / Phi.shape[0] + 2 * n * lam_l / D * om)
    _close(est.score(test), om.T)


# ----------------------------------------------------------------------------------- all methods
ALL = ["hessian_free", "diagonal_fisher", "datainf", "lissa", "rrinf", "rrinf_fixed_point", "exact"]


def test_available_methods_lists_all_gradient_methods():
    assert set(ALL) <= set(fastinf.available_methods())


@pytest.mark.parametrize("method", ALL)
def test_self_influence_is_diagonal_of_train_on_train(small_problem, method):
    train, _ = small_problem
    opts = {"tol": 0.0, "depth": 50} if method == "lissa" else {}
    est = fastinf.get_estimator(method, **opts).fit(train)
    _close(est.self_influence(), torch.diagonal(est.score(train)), 1e-8)


@pytest.mark.parametrize("method", ALL)
def test_reduce_mean_is_mean_of_rows(small_problem, method):
    train, test = small_problem
    opts = {"tol": 0.0, "depth": 50} if method == "lissa" else {}
    est = fastinf.get_estimator(method, **opts).fit(train)
    full = est.score(test)
    _close(est.score(test, reduce="mean"), full.mean(0), 1e-9)
    _close(est.score(test, reduce="sum"), full.sum(0), 1e-9)


def test_influence_one_call(small_problem):
    train, test = small_problem
    _close(fastinf.influence(train, test, method="exact"), Exact().fit(train).score(test))
    assert fastinf.influence(train, test, reduce="mean").shape == (train.n,)


@pytest.mark.parametrize("solve", ["n", "d"])
@pytest.mark.parametrize("blockwise", [False, True])
def test_exact_inverse_hvp_is_the_test_side_form(small_problem, solve, blockwise):
    train, test = small_problem
    est = Exact(solve=solve, blockwise=blockwise, damping="paper").fit(train)
    h = est.inverse_hvp(test)
    _close(-sum(h[k] @ train[k].T for k in train.names), est.score(test), 1e-8)
    # and it really is the damped inverse applied to t
    groups = [[k] for k in train.names] if blockwise else [train.names]
    for g in groups:
        X = torch.cat([train[k] for k in g], 1)
        H = X.T @ X / train.n + auto_lambda(train, g) * torch.eye(X.shape[1], dtype=torch.float64)
        T = torch.cat([test[k] for k in g], 1)
        _close(torch.cat([h[k] for k in g], 1), torch.linalg.solve(H, T.T).T, 1e-8)


def test_lissa_warns_when_not_converged(small_problem):
    train, test = small_problem
    est = LiSSA(depth=2).fit(train)
    with pytest.warns(RuntimeWarning, match="did not reach tol"):
        est.score(test)
    assert not est.converged_


def test_rrinf_streams_draws_in_segments(small_problem, monkeypatch):
    train, test = small_problem
    ref = RRInf(iters=300, sampling="minibatch", batch_size=3).fit(train).score(test)
    monkeypatch.setattr(RRInf, "_SEGMENT_ROWS", 40)  # forces many segments of a few steps
    got = RRInf(iters=300, sampling="minibatch", batch_size=3).fit(train).score(test)
    _close(got, ref, 1e-12)


# ----------------------------------------------------------------------------------- preconditioned_test
def _expected_h(method, train, test):
    """Independent h(t) (m, D) with score = −h Φᵀ, from METHODS.md, on the concatenated blocks."""
    n, X, T = train.n, train.matrix(), test.matrix()
    D = X.shape[1]
    lam = auto_lambda(train, train.names)
    eye = torch.eye(D, dtype=torch.float64)
    if method == "hessian_free":
        return T
    if method == "diagonal_fisher":
        return T / (X.pow(2).mean(0) + lam)
    if method == "exact":
        return torch.linalg.solve(X.T @ X / n + lam * eye, T.T).T
    if method in ("datainf", "lissa"):  # block-wise (their default)
        out = []
        for k in train.names:
            G, Tk, lk = train[k], test[k], auto_lambda(train, [k])
            if method == "datainf":
                C = (Tk @ G.T) / (lk + G.pow(2).sum(1))
                out.append((n * Tk - C @ G) / (n * lk))
            else:
                out.append(torch.linalg.solve(G.T @ G / n + lk * torch.eye(G.shape[1], dtype=torch.float64), Tk.T).T)
        return torch.cat(out, 1)
    if method == "rrinf_fixed_point":  # h = n W½ (W½ΦΦᵀW½ + nλI)⁻¹ W½ t, W = diag(1/‖φ_ι‖²) (push-through of §5)
        w = X.pow(2).sum(0).rsqrt()
        M = w[:, None] * (X.T @ X) * w[None, :] + n * lam * eye
        return n * (w[:, None] * torch.linalg.solve(M, (w[:, None] * T.T))).T
    raise AssertionError(method)


@pytest.mark.parametrize(
    "method", ["hessian_free", "diagonal_fisher", "datainf", "lissa", "exact", "rrinf_fixed_point"]
)
def test_preconditioned_test_is_the_methods_preconditioner(small_problem, method):
    train, test = small_problem
    opts = {"tol": 1e-10, "depth": 200000} if method == "lissa" else {}
    opts |= {"damping": "paper"} if method == "exact" else {}  # the papers' λ of _expected_h
    est = fastinf.get_estimator(method, **opts).fit(train)
    h = est.preconditioned_test(test)
    assert list(h) == train.names and all(h[k].shape == (test.n, train.dims[k]) for k in train.names)
    got = torch.cat([h[k] for k in train.names], 1)
    _close(got, _expected_h(method, train, test), 1e-8)
    _close(-sum(h[k] @ train[k].T for k in train.names), est.score(test), 1e-9)
