"""RRInf with zero rows (METHODS.md §5), rejected options, and the public Ω."""

import pytest
import torch
from conftest import make_blocks

from fastinf import GradientSet, RRInf, RRInfFixedPoint

F64 = torch.float64


def _zero_row_problem(seed=0, n=4, whole_zero_block=False):
    """Half of block "a"'s coordinates have no gradient in any example (like lora_A at init)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 8, generator=g, dtype=F64)
    X[:, :4] = 0.0
    train = {"a": X, "b": 0.5 * torch.randn(n, 3, generator=g, dtype=F64)}
    test = {"a": torch.randn(2, 8, generator=g, dtype=F64), "b": torch.randn(2, 3, generator=g, dtype=F64)}
    if whole_zero_block:
        train["A"] = torch.zeros(n, 5, dtype=F64)
        test["A"] = torch.randn(2, 5, generator=g, dtype=F64)
    return GradientSet(train), GradientSet(test)


def _weighted_ridge(train, test, lam, weights):
    """Independent closed form: ω = (Σ_ι a_ι φ_ιφ_ιᵀ/‖φ_ι‖² + λ̄I)⁻¹ Σ_ι a_ι υ_ι φ_ι/‖φ_ι‖², zero rows: no data
    term; a_ι the sampling weights (summing to 1), λ̄ = Σ_l (share of draws on l) · nλ_l/D. Returns (m, n)."""
    n = train.n
    Phi = train.matrix().T  # (D, n)
    Ups = -n * test.matrix().T  # (D, m)
    nsq = Phi.pow(2).sum(1)
    w = torch.where(nsq > 0, weights / torch.where(nsq > 0, nsq, torch.ones_like(nsq)), torch.zeros_like(nsq))
    A = Phi.T @ (w[:, None] * Phi) + lam * torch.eye(n, dtype=F64)
    return torch.linalg.solve(A, Phi.T @ (w[:, None] * Ups)).T


@pytest.mark.parametrize("sampling", ["neuron", "minibatch", "layer"])
def test_zero_rows_sgd_converges_to_the_fixed_point(sampling):
    """The iteration and rrinf_fixed_point solve the same problem: with zero rows the decaying-step SGD ends
    within 5 % of the closed form. (Skipping zero-row steps, regulariser included, or averaging layer steps
    over the non-zero rows only, stalls 11–24 % away on this problem.)"""
    train, test = _zero_row_problem()
    lam, n, D = 0.5, train.n, train.dim
    if sampling == "layer":  # one block per step, uniform over the L = 2 blocks: a_ι = 1/(L d_l)
        weights = torch.cat([torch.full((d,), 1.0 / (2 * d), dtype=F64) for d in train.dims.values()])
    else:
        weights = torch.full((D,), 1.0 / D, dtype=F64)
    want = _weighted_ridge(train, test, n * lam / D, weights)
    fp = RRInfFixedPoint(damping=lam, sampling=sampling).fit(train).score(test)
    torch.testing.assert_close(fp, want, rtol=1e-9, atol=0)
    kw = {"batch_size": 4} if sampling == "minibatch" else {}
    sgd = RRInf(damping=lam, lr=0.1, iters=4000, lr_decay=0.02, sampling=sampling, seed=0, **kw).fit(train)
    dist = float((sgd.score(test) - want).norm() / want.norm())
    assert dist < 0.05, dist


def test_layer_mode_with_an_all_zero_block():
    """lora_A while lora_B = 0: the whole block is zero. damping='auto' gives it λ_l = 0 (its steps do
    nothing) instead of refusing; SGD and fixed point still agree."""
    train, test = _zero_row_problem(seed=3, whole_zero_block=True)
    fp = RRInfFixedPoint(sampling="layer").fit(train).score(test)
    dims = train.dims
    L, n, D = len(dims), train.n, train.dim
    lam_l = {k: 0.1 * float(train[k].pow(2).mean()) for k in train.names}
    assert lam_l["A"] == 0.0
    weights = torch.cat([torch.full((d,), 1.0 / (L * d), dtype=F64) for d in dims.values()])
    want = _weighted_ridge(train, test, sum(n * v / D for v in lam_l.values()) / L, weights)
    torch.testing.assert_close(fp, want, rtol=1e-9, atol=0)
    sgd = RRInf(sampling="layer", lr=0.2, iters=6000, lr_decay=0.01, seed=1).fit(train).score(test)
    assert float((sgd - want).norm() / want.norm()) < 0.05
    with pytest.raises(ValueError, match="all zero"):
        RRInf(sampling="layer").fit(GradientSet({"A": torch.zeros(3, 2, dtype=F64)}))


@pytest.mark.parametrize("sampling,b", [("neuron", 1), ("minibatch", 3)])
def test_zero_row_steps_match_a_plain_loop(monkeypatch, sampling, b):
    """Step by step, against a loop of METHODS.md §5: Ω ← Ω − η[(1/b) Σ_rows 2φ(φᵀΩ − Υ_ι)/‖φ‖² + 2λ̃Ω] with
    zero rows contributing no data term. Strong damping and short segments exercise the rescaling the
    estimator uses to keep the regulariser on zero-row steps with the row-update kernel."""
    train, test = _zero_row_problem(seed=5)
    lam, lr = 2.0, 0.3
    kw = {"batch_size": b} if sampling == "minibatch" else {}
    est = RRInf(damping=lam, lr=lr, iters=600, sampling=sampling, seed=2, **kw).fit(train)
    monkeypatch.setattr(RRInf, "_SEGMENT_ROWS", 60)
    got = est.score(test)
    n, D = train.n, train.dim
    Phi, Ups = train.matrix().T, -n * test.matrix().T
    reg = n * lam / D
    om = torch.zeros(n, test.n, dtype=F64)
    for step in est.coords_.reshape(-1, b).tolist():
        data = torch.zeros_like(om)
        for c in step:
            nsq = float(Phi[c] @ Phi[c])
            if nsq > 0:
                data += 2 * torch.outer(Phi[c], Phi[c] @ om - Ups[c]) / nsq
        om = om - lr * (data / b + 2 * reg * om)
    torch.testing.assert_close(got, om.T, rtol=1e-10, atol=1e-14)


def test_no_zero_rows_keeps_the_plain_kernel_path():
    train, test = make_blocks(6, {"a": 5, "b": 4}, seed=1), make_blocks(2, {"a": 5, "b": 4}, seed=2)
    est = RRInf(iters=50).fit(train)
    assert est.step_factor_ is None
    torch.testing.assert_close(est.omega(test), est.score(test).T, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [RRInf, RRInfFixedPoint])
def test_blockwise_is_rejected(cls):
    with pytest.raises(ValueError, match="blockwise"):
        cls(blockwise=True)


def test_omega_is_public_and_first_step_exact():
    train, test = make_blocks(5, {"a": 4, "b": 3}, seed=7), make_blocks(3, {"a": 4, "b": 3}, seed=8)
    est = RRInf(iters=1, lr=0.05, seed=4).fit(train)
    (c,) = est.coords_.tolist()
    phi = train.matrix()[:, c]
    want = 2 * 0.05 * phi[:, None] * (-train.n * test.matrix()[:, c])[None, :] / (phi @ phi)  # (n, m)
    torch.testing.assert_close(est.omega(test), want, rtol=1e-12, atol=0)
    with pytest.raises(NotImplementedError, match="omega"):
        est.preconditioned_test(test)


def test_layer_mode_applies_a_damping_rule_per_block():
    """damping='mean_eig' in layer sampling: λ_l = c · ‖Φ_l‖²_F / (n · min(n, d_l)) from each block's own
    gradients (METHODS.md §10), not the papers' formula; the same run as with those λ_l given as a dict."""
    train, test = make_blocks(12, {"a": 5, "b": 30}, seed=4), make_blocks(3, {"a": 5, "b": 30}, seed=5)
    n = train.n
    want = {k: 10.0 * float(train[k].double().pow(2).sum()) / (n * min(n, d)) for k, d in train.dims.items()}
    rule = RRInf(sampling="layer", iters=300, seed=2, damping=("mean_eig", {"c": 10.0})).fit(train)
    assert rule.lambdas_ == pytest.approx(want, rel=1e-12)
    explicit = RRInf(sampling="layer", iters=300, seed=2, damping=want).fit(train)
    torch.testing.assert_close(rule.score(test), explicit.score(test), rtol=1e-12, atol=0)
    paper = RRInf(sampling="layer", iters=300, seed=2).fit(train)
    assert not torch.allclose(paper.score(test), rule.score(test), rtol=1e-3)
