"""sample_posterior_traces: SGLD on models whose local posterior is known in closed form.

The workhorse is linear regression, per-example loss ℓ_i(w) = ½(x_iᵀw + c − y_i)² with a frozen
offset c and a Dropout on the inputs (identity in eval mode, which the sampler must use). With
L_n = mean loss, H = XᵀX/n and b = Xᵀ(y − c)/n, the localised tempered posterior
p(w) ∝ exp(−nβ L_n(w) − (γ/2)‖w − w*‖²) is Gaussian:

    precision A = nβ H + γ I,   mean μ = A⁻¹ (nβ b + γ w*).

Full-batch SGLD w' = w − (ε/2) P A (w − μ) + √(εP) ξ (P = I for plain SGLD) is a linear AR(1) chain:
its stationary mean is exactly μ and its stationary covariance S solves S = M S Mᵀ + εP with
M = I − (ε/2) P A; for P = I, S = (A − εA²/4)⁻¹ = Σ + O(ε). The tests compare the draws with both
S (the chain's exact target: tight, Monte Carlo error only) and Σ = A⁻¹ (the posterior: Monte Carlo
error plus the O(ε) bias, which the chosen ε keeps below 8 %).
"""

import json
import math
import warnings

import pytest
import torch

import fastinf
from fastinf.testing import lm_batches, tiny_lora_llama
from fastinf.traces.sampler import (
    PosteriorTraces,
    SamplerDiagnostics,
    SamplingDivergedError,
    _chain_seed,
    compute_diagnostics,
    effective_sample_size,
    sample_posterior_traces,
    split_rhat,
)

F64 = torch.float64


class LinReg(torch.nn.Module):
    def __init__(self, w, c=0.3):
        super().__init__()
        self.w = torch.nn.Parameter(w.clone())
        self.c = torch.nn.Parameter(torch.tensor(c, dtype=w.dtype), requires_grad=False)
        self.drop = torch.nn.Dropout(0.5)


def lin_loss(model, batch):
    return 0.5 * (model.drop(batch["x"]) @ model.w + model.c - batch["y"]) ** 2


def problem(*, at_optimum=False, n=40, eig=(0.01, 0.015, 0.02), seed=0):
    """X with XᵀX/n = R diag(eig) Rᵀ (R a random rotation). at_optimum: residuals ±1 at the least-squares
    solution w* (so per-example gradients r_i x_i have empirical Fisher = Hessian); otherwise w* is
    off the optimum, so that the posterior mean differs from w*."""
    g = torch.Generator().manual_seed(seed)
    d = len(eig)
    R, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    if at_optimum:
        r = torch.randint(0, 2, (n,), generator=g).to(F64) * 2 - 1
        Z = torch.randn(n, d, generator=g, dtype=F64)
        Z -= torch.outer(r, r @ Z) / n  # Zᵀr = 0
    else:
        r = None
        Z = torch.randn(n, d, generator=g, dtype=F64)
    Q, _ = torch.linalg.qr(Z)  # orthonormal columns (spanning Z's column space, so still ⟂ r)
    X = Q @ torch.diag(torch.tensor(eig, dtype=F64).sqrt()) @ R.T * math.sqrt(n)
    w_true = torch.tensor([1.0, -2.0, 0.5], dtype=F64)[:d]
    if at_optimum:
        y = X @ w_true + 0.3 + r
        w_star = w_true.clone()
    else:
        y = X @ w_true + 0.3 + 0.1 * torch.randn(n, generator=g, dtype=F64)
        w_star = w_true + torch.tensor([1.0, 1.2, -0.8], dtype=F64)[:d]
    return X, y, w_star, r


def posterior(X, y, w_star, n_beta, gamma, c=0.3):
    n, d = X.shape
    H = X.T @ X / n
    b = X.T @ (y - c) / n
    A = n_beta * H + gamma * torch.eye(d, dtype=F64)
    mu = torch.linalg.solve(A, n_beta * b + gamma * w_star)
    return A, mu, H, b


def inv_sqrt(S):
    ev, U = torch.linalg.eigh(S)
    return U @ torch.diag(ev.rsqrt()) @ U.T


def discrete_lyapunov(M, Q):
    """S with S = M S Mᵀ + Q."""
    d = M.shape[0]
    vec = torch.linalg.solve(torch.eye(d * d, dtype=F64) - torch.kron(M, M), Q.reshape(-1))
    return vec.reshape(d, d)


def run_recording(model, batches, **kw):
    draws = []
    kw.setdefault("progress", False)
    kw.setdefault("loss_fn", lin_loss)
    out = sample_posterior_traces(
        model, batches, {"train": batches}, callback=lambda c, d, p: draws.append(p["w"].clone()), **kw
    )
    return out, torch.stack(draws)


def whitened_errors(W, mu, S):
    """(whitened mean error (d,), whitened covariance − I (d, d)) of draws W (N, d) against N(mu, S)."""
    iS = inv_sqrt(S)
    return iS @ (W.mean(0) - mu), iS @ torch.cov(W.T) @ iS - torch.eye(W.shape[1], dtype=F64)


def check_gaussian(W, mu, S, *, chains, batches_per_chain=5, max_se=0.06):
    """Draws W (chains·draws, d), chain by chain, match N(mu, S) within 4 Monte Carlo standard errors.
    The standard errors come from batch means (contiguous batches within chains), and must be small
    enough (max_se) for the check to have power against an O(1) error in the mean or the covariance."""
    z, K = whitened_errors(W, mu, S)
    parts = [whitened_errors(b, mu, S) for c in W.chunk(chains) for b in c.chunk(batches_per_chain)]
    B = len(parts)
    se_z = torch.stack([p[0] for p in parts]).std(0) / math.sqrt(B)
    se_K = torch.stack([p[1] for p in parts]).std(0) / math.sqrt(B)
    assert float(se_z.max()) < max_se and float(se_K.max()) < max_se, (se_z, se_K)
    assert bool((z.abs() < 4 * se_z).all()), (z, se_z)
    assert bool((K.abs() < 4 * se_K).all()), (K, se_K)
    return z, K


def check_posterior(W, mu, Sigma, S):
    """The chain's stationary covariance S is the posterior Σ up to < 8 % (O(ε) bias), and so the draws
    match the posterior directly within Monte Carlo error (≤ 4 × 0.06) plus that bias."""
    bias = inv_sqrt(Sigma) @ S @ inv_sqrt(Sigma) - torch.eye(S.shape[0], dtype=F64)
    assert float(bias.abs().max()) < 0.08, bias
    z, K = whitened_errors(W, mu, Sigma)
    assert float(z.abs().max()) < 0.25 and float(K.abs().max()) < 0.32, (z, K)


# ------------------------------------------------------------------------------ closed-form posterior
NB, GAMMA = 1000.0, 10.0  # A has eigenvalues 20, 25, 30
# 4 chains × 2000 draws (thinned by 2, after 200 burn-in steps): Monte Carlo standard errors below 0.06
LONG_RUN = dict(n_beta=NB, localization=GAMMA, chains=4, draws=2000, thin=2, burnin=200)
# a few steps of 2 chains: enough to move the weights (the restore tests)
SHORT_RUN = dict(n_beta=NB, localization=GAMMA, step_size=0.01, chains=2, draws=10, progress=False)


def _one_batch(X, y):
    """(train batches, {"train": the same batches}): the sampler's loader and its traced sets."""
    batches = [{"x": X, "y": y}]
    return batches, {"train": batches}


def test_gaussian_posterior_plain_sgld():
    X, y, w_star, _ = problem()
    A, mu, _, _ = posterior(X, y, w_star, NB, GAMMA)
    Sigma = torch.linalg.inv(A)
    # the posterior mean is far from w* (in posterior sd), so a wrong centre would be caught
    assert float((inv_sqrt(Sigma) @ (mu - w_star)).abs().max()) > 2
    eps = 0.01  # ε·λ_max = 0.3: stationary covariance (A − εA²/4)⁻¹ is ≤ 8 % above Σ
    model = LinReg(w_star)
    _, W = run_recording(model, [{"x": X, "y": y}], step_size=eps, **LONG_RUN)
    S = torch.linalg.inv(A - eps * A @ A / 4)
    check_gaussian(W, mu, S, chains=4)  # the chain's exact stationary law, within Monte Carlo error
    check_posterior(W, mu, Sigma, S)


def test_gaussian_posterior_rmsprop():
    """With |g| ≪ 0.1 the RMSProp preconditioner is nearly constant, P ≈ diag(1/(√E[g²] + 0.1)) ≈ 9.5,
    and the chain targets the posterior up to O(εP) bias."""
    X, y, w_star, _ = problem()
    A, mu, H, b = posterior(X, y, w_star, NB, GAMMA)
    Sigma = torch.linalg.inv(A)
    eps = 0.001
    model = LinReg(w_star)
    _, W = run_recording(model, [{"x": X, "y": y}], step_size=eps, preconditioner="rmsprop", **LONG_RUN)
    # E[g gᵀ] under the chain's stationary law (g = H w − b), for the preconditioner's V
    S = Sigma
    for _ in range(3):
        Egg = H @ (S + torch.outer(mu, mu)) @ H - torch.outer(H @ mu, b) - torch.outer(b, H @ mu) + torch.outer(b, b)
        P = torch.diag(1 / (Egg.diagonal().sqrt() + 0.1))
        S = discrete_lyapunov(torch.eye(3, dtype=F64) - eps / 2 * P @ A, eps * P)
    assert float(P.diagonal().min()) > 8  # preconditioning is far from the identity
    check_gaussian(W, mu, S, chains=4)
    check_posterior(W, mu, Sigma, S)


def test_one_step_update_matches_formula():
    """Three steps of each chain, reproduced by hand (float64): minibatches cycle, the noise comes from a
    generator seeded from (seed, chain) in parameter order, and RMSProp uses g = ∇L_B (unscaled),
    V ← 0.99 V + 0.01 g², V̂ = V / (1 − 0.99ᵗ), P = 1 / (√V̂ + 0.1), step ε P, noise √(ε P) ξ."""
    X, y, w_star, _ = problem()
    batches = [{"x": X[:25], "y": y[:25]}, {"x": X[25:], "y": y[25:]}]
    nb, gam, eps, seed = 50.0, 3.0, 0.02, 11
    for pre in (None, "rmsprop"):
        model = LinReg(w_star)
        got = {}
        with pytest.warns(RuntimeWarning, match="fewer than 8 draws"):
            sample_posterior_traces(
                model,
                batches,
                {"train": batches},
                n_beta=nb,
                localization=gam,
                step_size=eps,
                chains=2,
                draws=3,
                preconditioner=pre,
                seed=seed,
                loss_fn=lin_loss,
                params=["w", "c"],  # an explicit list: the frozen offset c is sampled too
                progress=False,
                callback=lambda c, d, p, got=got: got.__setitem__((c, d), (p["w"].clone(), p["c"].clone())),
            )
        for chain in range(2):
            gen = torch.Generator().manual_seed(_chain_seed(seed, chain))
            w0, c0 = w_star.clone(), torch.tensor(0.3, dtype=F64)
            w, c = w0.clone(), c0.clone()
            V = [torch.zeros(3, dtype=F64), torch.zeros((), dtype=F64)]
            for t in range(1, 4):
                b = batches[(t - 1) % 2]
                r = b["x"] @ w + c - b["y"]
                grads = [b["x"].T @ r / len(r), r.mean()]
                new = []
                for k, (v, v0, g) in enumerate(zip((w, c), (w0, c0), grads, strict=True)):
                    xi = torch.randn(v.shape, generator=gen, dtype=F64)
                    P = torch.ones_like(v)
                    if pre:
                        V[k] = 0.99 * V[k] + 0.01 * g**2
                        P = 1 / ((V[k] / (1 - 0.99**t)).sqrt() + 0.1)
                    new.append(v - eps / 2 * P * (nb * g + gam * (v - v0)) + (eps * P).sqrt() * xi)
                w, c = new
                gw, gc = got[(chain, t - 1)]
                torch.testing.assert_close(gw, w, rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(gc, c, rtol=1e-12, atol=1e-12)
        assert not torch.equal(got[(0, 2)][0], got[(1, 2)][0])  # chains get different noise


def test_laplace_limit_matches_exact():
    """METHODS.md §8 Laplace limit. For a quadratic loss the posterior is N(w*, Σ), Σ = (nβ H + γ I)⁻¹ when
    w* is the least-squares optimum, and Cov(ℓ_i, ℓ_j) = g_iᵀ Σ g_j + ½ (x_iᵀ Σ x_j)², so
    nβ · BIF(i, j) = −g_iᵀ (H + λ I)⁻¹ g_j + O(1/nβ) with λ = γ / (nβ): the damped influence with the
    Hessian H. (METHODS.md writes "β·BIF"; with fastinf's mean-loss influence, §0, the factor is nβ.)
    The data make every residual at w* equal ±1, so the empirical Fisher (1/n) Σ g gᵀ that Exact uses equals
    H exactly, and Exact(damping=λ) is the right reference."""
    X, y, w_star, r = problem(at_optimum=True, eig=(0.5, 1.0, 2.0))
    n = X.shape[0]
    g = torch.Generator().manual_seed(5)
    Xt = torch.randn(12, 3, generator=g, dtype=F64)
    yt = Xt @ w_star + 0.3 + torch.randn(12, generator=g, dtype=F64)
    G_train = (X @ w_star + 0.3 - y)[:, None] * X  # per-example gradients at w*: r_i x_i
    G_test = (Xt @ w_star + 0.3 - yt)[:, None] * Xt
    torch.testing.assert_close(G_train.T @ G_train / n, X.T @ X / n)  # Fisher == Hessian
    nb, gam = 1000.0, 1000.0
    lam = gam / nb
    model = LinReg(w_star)
    traces = sample_posterior_traces(
        model,
        [{"x": X, "y": y}],
        {"train": [{"x": X, "y": y}], "test": [{"x": Xt[:7], "y": yt[:7]}, {"x": Xt[7:], "y": yt[7:]}]},
        n_beta=nb,
        localization=gam,
        step_size=1e-4,  # ε·λ_max(A) = 0.3
        chains=4,
        draws=800,
        burnin=100,
        thin=2,
        loss_fn=lin_loss,
        progress=False,
    )
    assert traces.diagnostics.plateaued and traces.diagnostics.converged
    bif = fastinf.BIF().fit(traces["train"])
    got = nb * bif.score(traces["test"])
    exact = fastinf.Exact(damping=lam).fit(fastinf.GradientSet({"w": G_train}))
    ref = exact.score(fastinf.GradientSet({"w": G_test}))
    assert got.shape == ref.shape == (12, n)
    corr = float(torch.corrcoef(torch.stack([got.reshape(-1), ref.reshape(-1)]))[0, 1])
    slope = float((got * ref).sum() / (ref * ref).sum())
    assert corr > 0.95, corr
    assert 0.8 < slope < 1.2, slope
    si = nb * bif.self_influence()
    si_ref = exact.self_influence()
    assert float(torch.corrcoef(torch.stack([si, si_ref]))[0, 1]) > 0.9
    assert 0.8 < float(si.mean() / si_ref.mean()) < 1.2


# ------------------------------------------------------------------------------ restoring the model
def _state(model):
    return (
        {k: v.detach().clone() for k, v in model.named_parameters()},
        {k: v.requires_grad for k, v in model.named_parameters()},
        {k: m.training for k, m in model.named_modules()},
    )


def _assert_restored(model, before, rng_before):
    params, flags, modes = before
    for k, v in model.named_parameters():
        assert torch.equal(v.detach(), params[k]), k
        assert v.requires_grad == flags[k], k
    assert {k: m.training for k, m in model.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_restores_weights_flags_and_mode():
    X, y, w_star, _ = problem()
    model = LinReg(w_star)
    model.train()
    before, rng = _state(model), torch.get_rng_state()
    seen = []

    def cb(c, d, p):
        assert not model.training and not model.drop.training  # dropout off while sampling
        assert not model.c.requires_grad
        seen.append(p["w"].clone())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 10 draws: diagnostics are not the point here
        sample_posterior_traces(model, *_one_batch(X, y), loss_fn=lin_loss, callback=cb, **SHORT_RUN)
    assert not torch.equal(seen[-1], w_star)  # the weights did move
    _assert_restored(model, before, rng)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_restores_weights_on_exception(exc):
    X, y, w_star, _ = problem()
    model = LinReg(w_star)
    model.train()
    before, rng = _state(model), torch.get_rng_state()
    calls = []

    def failing(m, b):
        calls.append(1)
        if len(calls) == 15:  # mid-sampling: after 1 reference pass and several steps/draws
            raise exc("injected")
        return lin_loss(m, b)

    with pytest.raises(exc, match="injected"):
        sample_posterior_traces(model, *_one_batch(X, y), loss_fn=failing, **SHORT_RUN)
    assert len(calls) == 15
    _assert_restored(model, before, rng)


def test_low_precision_and_unused_parameters():
    """bfloat16 adapter weights are updated through a float32 master copy and restored bit for bit;
    a sampled parameter the loss does not use gets a warning."""
    X, y, w_star, _ = problem()
    model = LinReg(w_star).to(torch.bfloat16)
    model.unused = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    before, rng = _state(model), torch.get_rng_state()
    batch = {"x": X.bfloat16(), "y": y.bfloat16()}
    seen = []
    with pytest.warns(RuntimeWarning) as rec:  # also: 8 draws from an off-optimum w* have not plateaued
        out = sample_posterior_traces(
            model,
            [batch],
            {"train": [batch]},
            n_beta=NB,
            localization=GAMMA,
            step_size=1e-4,
            chains=1,
            draws=8,
            loss_fn=lin_loss,
            progress=False,
            callback=lambda c, d, p: seen.append(p["unused"].float().clone()),
        )
    assert sum("get no gradient" in str(r.message) for r in rec) == 1  # once, not every step
    assert out["train"].losses.dtype == torch.float32
    assert not torch.equal(seen[-1], torch.zeros(2))  # it diffuses under the localization term
    _assert_restored(model, before, rng)


# ------------------------------------------------------------------------------ outputs, determinism
class DictDataset(torch.utils.data.Dataset):
    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.X[i], "y": self.y[i]}


def _run_loaders(seed, chains=3, draws=12, **kw):
    X, y, w_star, _ = problem()
    Xt, yt = X[:9] * 1.5, y[:9] - 0.2
    ds = DictDataset(X, y)
    model = LinReg(w_star)
    train = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True)  # no generator: the sampler seeds it
    evals = {
        "train": torch.utils.data.DataLoader(ds, batch_size=16),
        "test": torch.utils.data.DataLoader(DictDataset(Xt, yt), batch_size=4),
    }
    out = sample_posterior_traces(
        model,
        train,
        evals,
        n_beta=NB,
        localization=GAMMA,
        step_size=0.005,
        chains=chains,
        draws=draws,
        burnin=3,
        thin=2,
        seed=seed,
        loss_fn=lin_loss,
        progress=False,
        **kw,
    )
    return out, model, (X, y, Xt, yt, w_star)


def test_outputs_and_determinism():
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 12 draws: diagnostics are not the point here
        a, model, (X, y, Xt, yt, w_star) = _run_loaders(3)
        b, _, _ = _run_loaders(3)
        c, _, _ = _run_loaders(4)
        d, _, _ = _run_loaders(3, preconditioner="rmsprop")
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched
    assert isinstance(a, PosteriorTraces) and isinstance(a, dict)
    assert list(a) == ["train", "test"] and "diagnostics" not in a
    assert a["diagnostics"] is a.diagnostics and isinstance(a.diagnostics, SamplerDiagnostics)
    tr, te = a["train"], a["test"]
    assert isinstance(tr, fastinf.LossTrace)
    assert tr.losses.shape == (36, 40) and te.losses.shape == (36, 9)
    assert torch.equal(tr.chains, torch.tensor([0] * 12 + [1] * 12 + [2] * 12))
    assert torch.equal(te.chains, tr.chains)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(tr.reference, lin_loss(model, {"x": X, "y": y}), rtol=0, atol=0)
        torch.testing.assert_close(te.reference, lin_loss(model, {"x": Xt, "y": yt}), rtol=0, atol=0)
    for name in ("train", "test"):
        assert torch.equal(a[name].losses, b[name].losses)
        assert torch.equal(a[name].reference, b[name].reference)
        assert not torch.equal(a[name].losses, c[name].losses)
        assert not torch.equal(a[name].losses, d[name].losses)
    # chains differ from one another, and every draw differs from w*
    assert not torch.equal(tr.losses[:12], tr.losses[12:24])
    assert bool((tr.losses != tr.reference).any(1).all())
    # diagnostics: per-eval-set mean loss per chain and draw
    dg = a.diagnostics
    assert dg.mean_loss["test"].shape == (3, 12)
    torch.testing.assert_close(dg.mean_loss["test"].reshape(-1), te.losses.double().mean(1))
    assert dg.drift["train"].shape == (3,) and dg["rhat"] is dg.rhat
    assert dg.settings["step_size"] == 0.005 and dg.settings["params"] == ["w"]
    js = json.loads(json.dumps(dg.to_dict()))
    assert js["ok"] == dg.ok and len(js["mean_loss"]["test"]) == 3 and js["settings"]["chains"] == 3
    # the traces feed BIF directly
    s = fastinf.BIF().fit(tr).score(te)
    assert s.shape == (9, 40) and bool(torch.isfinite(s).all())


# ------------------------------------------------------------------------------ diagnostics
def _diag_run(burnin, draws, thin, step_size=1e-3, seed=0):
    X, y, w_star, _ = problem()  # w* is > 2 posterior sd from the posterior mean
    return sample_posterior_traces(
        LinReg(w_star),
        [{"x": X, "y": y}],
        {"train": [{"x": X, "y": y}]},
        n_beta=NB,
        localization=GAMMA,
        step_size=step_size,
        chains=4,
        draws=draws,
        burnin=burnin,
        thin=thin,
        seed=seed,
        loss_fn=lin_loss,
        progress=False,
    )


def test_diagnostics_flag_a_chain_that_has_not_plateaued():
    # no burn-in and a small step: the chains are still travelling from w* towards the posterior mean
    # (relaxation time 1 / (ε λ / 2) ≈ 70–100 steps > 60 draws), so the mean loss keeps falling
    with pytest.warns(RuntimeWarning) as rec:
        out = _diag_run(burnin=0, draws=60, thin=1)
    text = " | ".join(str(r.message) for r in rec)
    assert "not plateaued" in text and "R-hat" in text, text  # the trend also shows in split-R-hat
    dg = out.diagnostics
    assert not dg.plateaued and not dg.ok
    assert bool((dg.drift["train"] < -1).all())  # falling by > 1 sd in every chain
    assert bool(((dg.drift["train"] < -0.5) & (dg.drift_z["train"] < -3)).any())
    assert any("not plateaued" in m for m in dg.messages)


def test_diagnostics_quiet_on_well_mixed_chains():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = _diag_run(burnin=400, draws=100, thin=8, step_size=0.01)
    dg = out.diagnostics
    assert dg.plateaued and dg.converged and dg.ok and not dg.messages
    assert bool((dg.drift["train"].abs() < 0.5).all() | (dg.drift_z["train"].abs() < 3).all())
    assert dg.rhat["train"] < 1.05
    assert 100 < dg.ess["train"] <= 4 * 100 * 1.5
    assert "R-hat" in dg.summary()


def test_rhat_and_ess_estimators():
    g = torch.Generator().manual_seed(0)
    iid = torch.randn(4, 2000, generator=g, dtype=F64)
    assert abs(split_rhat(iid) - 1) < 0.01
    assert abs(effective_sample_size(iid) / 8000 - 1) < 0.15
    # AR(1) with ρ = 0.9: ESS ≈ N (1 − ρ) / (1 + ρ)
    x = torch.zeros(4, 2000, dtype=F64)
    noise = torch.randn(4, 2000, generator=g, dtype=F64)
    for t in range(1, 2000):
        x[:, t] = 0.9 * x[:, t - 1] + noise[:, t]
    assert abs(effective_sample_size(x) / (8000 * 0.1 / 1.9) - 1) < 0.3
    assert abs(split_rhat(x) - 1) < 0.05
    # chains that disagree, or trend within chains, have R-hat > 1.1
    assert split_rhat(iid + torch.arange(4, dtype=F64)[:, None]) > 1.1
    assert split_rhat(iid + torch.linspace(0, 3, 2000, dtype=F64)) > 1.1
    # the drift flag: stationary chains pass, a trend of ~2 sd is flagged
    assert compute_diagnostics({"a": iid[:, :200]}, {"a": 0.0}).plateaued
    trend = compute_diagnostics({"a": iid[:, :200] + torch.linspace(0, 6, 200, dtype=F64)}, {"a": 0.0})
    assert not trend.plateaued and bool((trend.drift["a"] > 1).all()) and bool((trend.drift_z["a"] > 3).all())
    assert math.isnan(split_rhat(torch.ones(2, 10)))
    assert math.isnan(effective_sample_size(torch.ones(2, 3)))


# ------------------------------------------------------------------------------ errors
def _kw(**over):
    X, y, w_star, _ = problem()
    kw = dict(
        model=LinReg(w_star),
        train_loader=[{"x": X, "y": y}],
        eval_sets={"train": [{"x": X, "y": y}]},
        n_beta=NB,
        localization=GAMMA,
        step_size=0.01,
        chains=1,
        draws=2,
        loss_fn=lin_loss,
        progress=False,
    )
    kw.update(over)
    return kw


def _shuffled():
    X, y, _, _ = problem()
    return torch.utils.data.DataLoader(DictDataset(X, y), batch_size=8, shuffle=True)


@pytest.mark.parametrize(
    "over, exc, match",
    [
        (dict(n_beta=0.0), ValueError, "n_beta must be"),
        (dict(n_beta=-5), ValueError, "n_beta must be"),
        (dict(n_beta=float("nan")), ValueError, "n_beta must be"),
        (dict(n_beta="1000"), TypeError, "n_beta"),
        (dict(localization=0), ValueError, "localization .* must be set"),
        (dict(localization=0.0), ValueError, "must be set"),
        (dict(localization=-1.0), ValueError, "localization must be"),
        (dict(step_size=0.0), ValueError, "step_size must be"),
        (dict(step_size=float("inf")), ValueError, "step_size must be"),
        (dict(preconditioner="adam"), ValueError, "preconditioner must be None or 'rmsprop'"),
        (dict(chains=0), ValueError, "chains must be"),
        (dict(draws=1), ValueError, "draws must be"),
        (dict(thin=0), ValueError, "thin must be"),
        (dict(burnin=-1), ValueError, "burnin must be"),
        (dict(seed=-1), ValueError, "seed must be"),
        (dict(train_loader=[]), ValueError, "train_loader yielded no batches"),
        (dict(eval_sets={}), ValueError, "eval_sets is empty"),
        (dict(eval_sets=[]), TypeError, "mapping"),
        (dict(eval_sets={"train": []}), ValueError, "eval set 'train' yielded no batches"),
        (dict(eval_sets={"diagnostics": [{}]}), ValueError, "reserved"),
        (dict(eval_sets={"train": "shuffled"}), ValueError, "shuffle"),
        (dict(params=["nope"]), ValueError, "no parameter named 'nope'"),
        (dict(params=[torch.nn.Parameter(torch.zeros(3))]), ValueError, "not a parameter of the model"),
        (dict(loss_fn=lambda m, b: lin_loss(m, b).sum()), ValueError, r"shape \(N,\)"),
        (dict(loss_fn=None), ValueError, "no default per-example loss"),
        (dict(preconditioner="rmsprop", callback=3), TypeError, "callback"),
    ],
)
def test_bad_inputs(over, exc, match):
    if over.get("eval_sets") == {"train": "shuffled"}:
        over["eval_sets"] = {"train": _shuffled()}
    kw = _kw(**over)
    model = kw["model"]
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    with pytest.raises(exc, match=match):
        sample_posterior_traces(**kw)
    for k, v in model.named_parameters():
        assert torch.equal(v.detach(), before[k])


def test_no_trainable_parameters():
    kw = _kw()
    kw["model"].w.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        sample_posterior_traces(**kw)


def test_non_finite_loss_at_trained_weights():
    X, y, w_star, _ = problem()
    y = y.clone()
    y[7] = float("nan")
    with pytest.raises(ValueError, match="example 7 at the trained weights"):
        sample_posterior_traces(**_kw(eval_sets={"train": [{"x": X, "y": y}]}))


def test_divergence_names_chain_and_step():
    kw = _kw(step_size=50.0, chains=2, draws=400)  # ε·λ ≫ 1: the chain explodes
    model = kw["model"]
    before = model.w.detach().clone()
    with pytest.raises(SamplingDivergedError, match=r"chain 0, step \d+.*smaller step_size"):
        sample_posterior_traces(**kw)
    assert torch.equal(model.w.detach(), before)


# ------------------------------------------------------------------------------ peft LoRA model
def test_peft_lora_only_adapters_move():
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    model = tiny_lora_llama(num_hidden_layers=1, pad_token_id=0, r=2, lora_alpha=4, lora_dropout=0.3)
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, model.config.vocab_size, (6, 7), generator=g)
    batches = lm_batches(ids, 3, mask=False)
    before, rng = _state(model), torch.get_rng_state()
    lora = {k for k, v in model.named_parameters() if v.requires_grad}
    assert lora and all("lora_" in k for k in lora)
    moved = set()

    def cb(c, d, p):
        assert set(p) == lora
        cur = dict(model.named_parameters())
        moved.update(k for k in cur if not torch.equal(cur[k].detach(), before[0][k]))

    with pytest.warns(RuntimeWarning, match="fewer than 8 draws"):
        out = sample_posterior_traces(
            model,
            batches,
            {"train": batches},  # default loss_fn: causal_lm_loss
            n_beta=20.0,
            localization=100.0,
            step_size=1e-3,
            chains=2,
            draws=3,
            callback=cb,
            progress=False,
        )
    assert moved == lora
    assert out["train"].losses.shape == (6, 6)
    _assert_restored(model, before, rng)
    from fastinf.gradients.losses import causal_lm_loss

    model.eval()
    with torch.no_grad():
        ref = torch.cat([causal_lm_loss(model, b) for b in batches])
    torch.testing.assert_close(out["train"].reference, ref, rtol=0, atol=0)
