"""Label-free damping (METHODS.md §10): select_damping against dense float64 formulas, the estimators'
damping= forms (rule names, (rule, options), dict block→λ) and the errors."""

import math

import pytest
import torch
from conftest import auto_lambda, dense_inverse_scores, make_blocks
from test_store_streaming import write_store

import fastinf
from fastinf.estimators.damping import GCV_EXPONENTS, Spectrum, check_rule, gcv_curve, group_spectra

DIMS = {"a.lora_A": 7, "a.lora_B": 5, "head": 3}  # D = 15


def dense(gs, names=None):
    names = names or gs.names
    return torch.cat([gs[k].double() for k in names], 1)


def brute_gcv(P, t, lams):
    """GCV(λ) from the explicit D×D hat matrix S_λ = Pᵀ(PPᵀ + nλI)⁻¹P."""
    n, D = P.shape
    out = []
    for lam in lams:
        S = P.T @ torch.linalg.solve(P @ P.T + n * lam * torch.eye(n, dtype=torch.float64), P)
        r = t - S @ t
        out.append(D * float(r @ r) / (D - float(torch.trace(S))) ** 2)
    return torch.tensor(out, dtype=torch.float64)


def spectra(gs, t, *, n_space=True):
    rows = lambda a, b: gs.iter_chunks(4, start=a, stop=b) if b > a else ()  # noqa: E731
    return group_spectra(rows, gs.n, gs.dims, [gs.names], test_mean=t, n_space=n_space)[tuple(gs.names)]


@pytest.mark.parametrize("n", [6, 40])  # n < D (n-space) and n > D (d-space)
def test_gcv_matches_the_explicit_hat_matrix(n):
    train, test = make_blocks(n, DIMS, seed=n), make_blocks(5, DIMS, seed=100 + n)
    P, t = dense(train), dense(test).mean(0)
    paper = auto_lambda(train, train.names)
    lams = [paper * 10.0 ** (k / 10) for k in GCV_EXPONENTS]
    want = brute_gcv(P, t, lams)
    tmean = {k: test[k].double().mean(0) for k in test.names}
    got = gcv_curve(spectra(train, tmean), lams)
    fin = torch.isfinite(want) & (want < 1e12)
    assert fin.sum() > 60
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-7, atol=0)
    lam = fastinf.select_damping(train, test, rule="gcv", chunk_size=4)
    assert lam == pytest.approx(lams[int(torch.argmin(torch.where(fin, want, math.inf)))], rel=1e-12)
    # an explicit grid is searched as given
    grid = [paper * 10.0**k for k in (-3, -1, 1, 3)]
    assert fastinf.select_damping(train, test, grid=grid) == grid[int(torch.argmin(brute_gcv(P, t, grid)))]


def test_gcv_equal_in_n_space_and_d_space():
    train, test = make_blocks(9, DIMS, seed=3), make_blocks(4, DIMS, seed=4)
    tmean = {k: test[k].double().mean(0) for k in test.names}
    sn, sd = spectra(train, tmean), spectra(train, tmean, n_space=False)
    assert sn.eig.numel() == 9 and sd.eig.numel() == 15  # really the two forms
    lams = [auto_lambda(train, train.names) * 10.0 ** (k / 10) for k in range(-40, 41)]
    torch.testing.assert_close(gcv_curve(sn, lams), gcv_curve(sd, lams), rtol=1e-8, atol=0)
    torch.testing.assert_close(sn.eig.sort().values, sd.eig.sort().values[-9:], rtol=1e-9, atol=1e-12)


def test_mean_eig_and_paper_against_the_eigenvalues():
    for n in (6, 40):
        train = make_blocks(n, DIMS, seed=n)
        eig = torch.linalg.eigvalsh(dense(train).T @ dense(train) / n)
        nonzero = eig[eig > eig.max() * 1e-10]
        assert nonzero.numel() == min(n, 15)
        for c in (0.5, 2.0):
            got = fastinf.select_damping(train, rule="mean_eig", c=c)
            assert got == pytest.approx(c * float(nonzero.mean()), rel=1e-10)
        assert fastinf.select_damping(train, rule="paper") == pytest.approx(0.1 * float(eig.sum()) / 15, rel=1e-10)


@pytest.mark.parametrize("n", [6, 40])
@pytest.mark.parametrize("share", [0.1, 0.5, 0.9])
def test_dof_hits_its_target_share(n, share):
    train = make_blocks(n, DIMS, seed=7 + n)
    sig = torch.linalg.eigvalsh(dense(train).T @ dense(train) / n).clamp_min(0)
    lam = fastinf.select_damping(train, rule="dof", share=share, chunk_size=5)
    assert float((sig / (sig + lam)).sum()) == pytest.approx(share * min(n, 15), rel=1e-9)
    # a wrong scale (nλ in place of λ) would miss the target by far
    assert abs(float((sig / (sig + n * lam)).sum()) - share * min(n, 15)) > 0.05


def test_dof_targets_the_rank_of_rank_deficient_gradients():
    # n = 6, D = 8 but rank 3: share · min(n, D) = 3.6 could never be reached; the target is share · rank
    x = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    P = torch.cat([x, -2 * x])
    lam = fastinf.select_damping(P, rule="dof", share=0.6)
    sig = torch.linalg.eigvalsh(P.T @ P / 6).clamp_min(0)
    assert float((sig / (sig + lam)).sum()) == pytest.approx(0.6 * 3, rel=1e-9)
    # the bias of a two-class head: per-example gradients ±a, rank 1, inside a block-wise choice
    a = torch.randn(2, dtype=torch.float64)
    signs = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0], dtype=torch.float64)[:, None]
    gs = fastinf.GradientSet({"w": torch.randn(5, 4, dtype=torch.float64), "bias": signs * 0.3 * a})
    lam_b = fastinf.select_damping(gs, rule="dof", share=0.5, blockwise=True)["bias"]
    s1 = float((gs["bias"].square().sum()) / 5)  # the one non-zero eigenvalue of G
    assert s1 / (s1 + lam_b) == pytest.approx(0.5, rel=1e-9)
    assert fastinf.DataInf(damping=("dof", {"share": 0.5})).fit(gs).lambdas_["bias"] == pytest.approx(lam_b, rel=1e-9)


def test_blockwise_is_each_blocks_own_rule():
    train, test = make_blocks(11, DIMS, seed=8), make_blocks(3, DIMS, seed=9)
    for rule, opts, tst in [("gcv", {}, test), ("mean_eig", {"c": 3.0}, None), ("dof", {"share": 0.4}, None)]:
        got = fastinf.select_damping(train, tst, rule=rule, blockwise=True, **opts)
        assert set(got) == set(train.names)
        for k in train.names:
            one = fastinf.select_damping(
                train.select([k]), tst.select([k]) if tst is not None else None, rule=rule, **opts
            )
            assert got[k] == pytest.approx(one, rel=1e-12), (rule, k)
        # a budget for one group's matrices at a time: the groups go in batches (a pass each), same λ
        tight = fastinf.select_damping(train, tst, rule=rule, blockwise=True, memory_budget=8 * 11 * 11 * 2, **opts)
        assert tight == pytest.approx(got, rel=1e-12), rule


def test_store_equals_in_memory(tmp_path):
    train, test = make_blocks(13, DIMS, seed=10), make_blocks(4, DIMS, seed=11)
    st = write_store(tmp_path / "tr", train, shard=4)
    ts = write_store(tmp_path / "te", test, shard=3)
    for rule, tst_mem, tst_st in [("gcv", test, ts), ("mean_eig", None, None), ("dof", None, None)]:
        for bw in (False, True):
            a = fastinf.select_damping(train, tst_mem, rule=rule, blockwise=bw, chunk_size=3)
            b = fastinf.select_damping(st, tst_st, rule=rule, blockwise=bw, chunk_size=3)
            if bw:
                assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-12) for k in a)
            else:
                assert a == pytest.approx(b, rel=1e-12)
    # a tensor test for blocked training gradients is split by block widths
    assert fastinf.select_damping(train, dense(test)) == fastinf.select_damping(train, test)


# ---------------------------------------------------------------------------------------- estimators
def test_estimators_with_dict_damping_equal_per_block_computation():
    train, test = make_blocks(12, DIMS, seed=12), make_blocks(3, DIMS, seed=13)
    lam = {"a.lora_A": 0.3, "a.lora_B": 0.02, "head": 1.5}
    ex = fastinf.Exact(blockwise=True, damping=lam).fit(train)
    want = dense_inverse_scores(train, test, {(k,): v for k, v in lam.items()}, [[k] for k in train.names])
    torch.testing.assert_close(ex.score(test), want, rtol=1e-10, atol=1e-12)
    assert ex.lambdas_ == lam
    di = fastinf.DataInf(damping=lam, dtype=torch.float64).fit(train)
    per = sum(
        fastinf.DataInf(damping=lam[k], dtype=torch.float64).fit(train.select([k])).score(test.select([k]))
        for k in train.names
    )
    torch.testing.assert_close(di.score(test), per, rtol=1e-10, atol=1e-12)
    for name in ("lissa", "diagonal_fisher"):
        est = fastinf.get_estimator(name, damping=lam, blockwise=True).fit(train)
        assert est.lambdas_ == lam


@pytest.mark.parametrize("n", [6, 40])
def test_estimator_rules_resolve_like_select_damping(n):
    train = make_blocks(n, DIMS, seed=14 + n)
    for rule in [("mean_eig", {"c": 2.0}), ("dof", {"share": 0.3}), "mean_eig", "dof", "paper"]:
        name, opts = (rule, {}) if isinstance(rule, str) else rule
        for bw in (False, True):
            want = fastinf.select_damping(train, rule=name, blockwise=bw, **opts)
            want = want if bw else dict.fromkeys(train.names, want)
            for method in ("exact", "datainf", "diagonal_fisher"):
                got = fastinf.get_estimator(method, damping=rule, blockwise=bw).fit(train).lambdas_
                assert got == pytest.approx(want, rel=1e-9), (rule, bw, method)
    assert fastinf.Exact(damping=fastinf.LABEL_FREE_RULE).fit(train).lambdas_ == pytest.approx(
        dict.fromkeys(
            train.names, fastinf.select_damping(train, rule=fastinf.LABEL_FREE_RULE[0], **fastinf.LABEL_FREE_RULE[1])
        )  # fmt: skip
    )


def test_explicit_damping_factor_keeps_the_papers_rule():
    train = make_blocks(10, DIMS, seed=15)
    for method in ("exact", "datainf"):
        est = fastinf.get_estimator(method, damping_factor=0.25, blockwise=False).fit(train)
        assert est.lambdas_["head"] == pytest.approx(auto_lambda(train, train.names, 0.25), rel=1e-12)
        est = fastinf.get_estimator(method, damping="paper", blockwise=False).fit(train)
        assert est.lambdas_["head"] == pytest.approx(auto_lambda(train, train.names), rel=1e-12)


def test_auto_is_each_methods_documented_default():
    train = make_blocks(10, DIMS, seed=16)
    for method in ("exact", "datainf", "lissa", "diagonal_fisher"):
        cls = fastinf.method_info(method).cls
        rule, opts = check_rule(*cls.default_damping)
        est = fastinf.get_estimator(method).fit(train)
        want = fastinf.select_damping(train, rule=rule, blockwise=bool(est.options.blockwise), **opts)
        got = est.lambdas_
        want = want if isinstance(want, dict) else dict.fromkeys(train.names, want)
        assert got == pytest.approx(want, rel=1e-12), method


# ---------------------------------------------------------------------------------------- errors
def test_errors_are_one_clear_line():
    train, test = make_blocks(8, DIMS, seed=17), make_blocks(3, DIMS, seed=18)
    rules = "'gcv', 'mean_eig', 'dof', 'paper'"
    with pytest.raises(ValueError, match=rf"unknown damping rule 'gvc'; the rules are {rules}"):
        fastinf.select_damping(train, test, rule="gvc")
    with pytest.raises(ValueError, match=r"rule 'gcv' needs the test gradients"):
        fastinf.select_damping(train)
    for bad in (0, -1.0, float("nan"), "1", True):
        with pytest.raises(ValueError, match=r"^damping rule 'mean_eig': c must be a positive finite number"):
            fastinf.select_damping(train, rule="mean_eig", c=bad)
    for bad in (0, 1, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"^damping rule 'dof': share must be a number in \(0, 1\)"):
            fastinf.select_damping(train, rule="dof", share=bad)
    with pytest.raises(ValueError, match=r"rule 'dof' takes no option\(s\) \['c'\]; its options: 'share'"):
        fastinf.select_damping(train, rule="dof", c=1.0)
    zero = fastinf.GradientSet({"a": torch.zeros(5, 3), "b": torch.randn(5, 2)})
    for rule in ("mean_eig", "dof", "paper"):
        with pytest.raises(ValueError, match=r"training gradients of 1 block\(s\) \('a'\) are all zero"):
            fastinf.select_damping(zero, rule=rule, blockwise=True)
        with pytest.raises(ValueError, match=r"training gradients are all zero"):
            fastinf.select_damping(fastinf.GradientSet({"a": torch.zeros(5, 3)}), rule=rule)
    zt = fastinf.GradientSet({k: test[k] * (k != "head") for k in DIMS})
    with pytest.raises(ValueError, match=r"mean test gradient of block\(s\) 'head' is zero; GCV cannot"):
        fastinf.select_damping(train, zt, blockwise=True)
    with pytest.raises(ValueError, match=r"rule 'gcv': the mean test gradient is zero"):
        fastinf.select_damping(train, fastinf.GradientSet({k: test[k] * 0 for k in DIMS}))
    with pytest.raises(ValueError, match=r"test blocks do not match the training blocks: missing \['head'\]"):
        fastinf.select_damping(train, test.select(["a.lora_A", "a.lora_B"]))


def test_estimator_damping_forms_are_validated():
    train = make_blocks(8, DIMS, seed=19)
    with pytest.raises(ValueError, match=r"^Exact: damping='gcv' needs the test gradients.*select_damping"):
        fastinf.Exact(damping="gcv")
    with pytest.raises(ValueError, match=r"^DataInf: damping='gcv' needs the test gradients"):
        fastinf.DataInf(damping=("gcv", {}))
    with pytest.raises(ValueError, match=r"^Exact: damping: damping rule 'mean_eig': c must be"):
        fastinf.Exact(damping=("mean_eig", {"c": -1}))
    with pytest.raises(ValueError, match=r"^DataInf: damping\['head'\] must be a positive finite float, got 0"):
        fastinf.DataInf(damping={"head": 0})
    with pytest.raises(ValueError, match=r"^Exact: damping as a dict block→λ needs a per-block preconditioner"):
        fastinf.Exact(damping=dict.fromkeys(DIMS, 0.1)).fit(train)
    with pytest.raises(ValueError, match=r"^DataInf: damping dict must name every training block.*missing \['head'\]"):
        fastinf.DataInf(damping={"a.lora_A": 0.1, "a.lora_B": 0.1}).fit(train)
    with pytest.raises(ValueError, match=r"unknown \['x'\]"):
        fastinf.DataInf(damping=dict.fromkeys([*DIMS, "x"], 0.1)).fit(train)
    with pytest.raises(ValueError, match=r"^Exact: damping='big' must|^Exact: damping must be 'auto'"):
        fastinf.Exact(damping="big")
    # a method without damping validates the dict and ignores it
    assert fastinf.HessianFree(damping=dict.fromkeys(DIMS, 0.1)).fit(train).score(train).shape == (8, 8)
    zero = fastinf.GradientSet({"a": torch.zeros(5, 3)})
    for rule in ("mean_eig", "dof"):
        with pytest.raises(ValueError, match=rf"^Exact: damping='{rule}' gives λ = 0 .* 1 of 1 blocks \('a'\)"):
            fastinf.Exact(damping=rule).fit(zero)


def test_spectrum_paper_lambda():
    assert Spectrum(n=4, width=5, sq_sum=2.0).paper_lambda == pytest.approx(0.1 * 2.0 / 20)


def test_exact_auto_is_mean_eig_c10_and_an_explicit_factor_is_the_papers_rule():
    """Exact()'s damping='auto' is λ = 10 · ‖P‖²_F / (n · min(n, D)) (written out, not read from the class);
    damping_factor given (even 0.1) or damping='paper' is λ = c · ‖P‖²_F / (n · D). Whether the factor was
    given survives equality, repr and dataclasses.replace, and ("paper", {}) takes the factor like 'paper'."""
    import dataclasses

    train = make_blocks(8, {"a": 5, "b": 7}, seed=11)
    P = torch.cat([train["a"], train["b"]], 1).double()
    n, D = P.shape
    sq = float(P.square().sum())
    assert fastinf.Exact().fit(train).lambdas_["a"] == pytest.approx(10 * sq / (n * min(n, D)), rel=1e-12)
    for est in (fastinf.Exact(damping_factor=0.1), fastinf.Exact(damping="paper")):
        assert est.fit(train).lambdas_["a"] == pytest.approx(0.1 * sq / (n * D), rel=1e-12)
    assert fastinf.Exact().options != fastinf.Exact(damping_factor=0.1).options
    kept = dataclasses.replace(fastinf.Exact().options, blockwise=False)
    assert kept.damping_rule(fastinf.Exact.default_damping) == ("mean_eig", {"c": 10.0})
    pair = fastinf.Exact(damping=("paper", {}), damping_factor=0.5).fit(train).lambdas_["a"]
    assert pair == pytest.approx(fastinf.Exact(damping="paper", damping_factor=0.5).fit(train).lambdas_["a"])
    assert pair == pytest.approx(0.5 * sq / (n * D), rel=1e-12)
