"""The loop oracles of fastinf.compat.reference_loops against dense closed forms (float64)."""

import torch

from fastinf import GradientSet
from fastinf.compat import reference_loops as loops

F64 = torch.float64


def _sets(n=9, m=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    dims = {"a": 5, "b": 12}  # one block with d < n, one with d > n
    tr = GradientSet({k: torch.randn(n, d, generator=g, dtype=F64) * (1 + i) for i, (k, d) in enumerate(dims.items())})
    te = GradientSet({k: torch.randn(m, d, generator=g, dtype=F64) for k, d in dims.items()})
    return tr, te


def _close(a, b, rtol=1e-10):
    assert float((a - b).abs().max()) <= rtol * float(b.abs().max()), float((a - b).abs().max() / b.abs().max())


def test_example_dicts_and_mean_and_lambda():
    tr, te = _sets()
    ex = loops.example_dicts(tr)
    assert len(ex) == tr.n and torch.equal(ex[4]["b"], tr["b"][4])
    v = loops.loop_val_mean(loops.example_dicts(te), te.names)
    _close(v["b"], te["b"].mean(0))
    assert abs(loops.loop_lambda(ex, "b") - 0.1 * float(tr["b"].pow(2).mean())) <= 1e-14 * float(tr["b"].pow(2).mean())


def test_hvps_match_dense_forms():
    tr, te = _sets()
    ex, n = loops.example_dicts(tr), tr.n
    v = te["b"].mean(0)
    X = tr["b"]
    lam = loops.loop_lambda(ex, "b")
    # DataInf: (1/(nλ)) Σ_i [v − (g_iᵀv/(λ + ‖g_i‖²)) g_i]
    c = (X @ v) / (lam + X.pow(2).sum(1))
    _close(loops.loop_hvp_proposed(ex, v, "b", lam), (n * v - c @ X) / (n * lam))
    # accurate: (XᵀX/n + λI)⁻¹ v, both eigen-solvers agree with a dense solve while d ≤ n
    H = X.T @ X / n + lam * torch.eye(X.shape[1], dtype=F64)
    A = loops.loop_outer_sum(ex, "b", n)
    _close(A, X.T @ X)
    _close(loops.loop_solve_accurate(A, v, lam, n), torch.linalg.solve(H, v), 1e-9)
    # LiSSA (the DataInf code's flipped sign): r_{k+1} = v + r_k − ((XᵀX/n) r_k − λ r_k)
    M = torch.eye(X.shape[1], dtype=F64) - (X.T @ X / n - lam * torch.eye(X.shape[1], dtype=F64))
    r = v.clone()
    for _ in range(4):
        r = v + M @ r
    _close(loops.loop_hvp_lissa(ex, v, "b", lam, iters=4), r)
    # IF = −Φ h
    _close(loops.loop_if(ex, {"b": v}), -(X @ v))


def test_oracle_exact_mean_both_spaces():
    tr, te = _sets()
    for k in ("a", "b"):  # d ≤ n (d-space) and d > n (n-space)
        X, T = tr[k], te[k]
        n, d = X.shape
        lam = 0.1 * float(X.pow(2).mean())
        want = -(X @ torch.linalg.solve(X.T @ X / n + lam * torch.eye(d, dtype=F64), T.mean(0)))
        _close(loops.oracle_exact_mean(X, T), want, 1e-9)


def test_rrinf_loops_first_step_and_agreement():
    tr, te = _sets()
    ex, te_ex = loops.example_dicts(tr), loops.example_dicts(te)
    n, names = tr.n, tr.names
    Phi = tr.matrix().T  # (D, n)
    vbar = te.matrix().mean(0)
    # first step from zero on row ι: ω₁ = 2η υ_ι φ_ι / ‖φ_ι‖², υ = −n v̄ (METHODS.md §5)
    iota, lr = 7, 0.05
    want = 2 * lr * (-n * vbar[iota]) * Phi[iota] / Phi[iota].pow(2).sum()
    _close(loops.loop_rrinf(Phi, te_ex, names, [iota], lr), want)
    # the multi-query loop with the mean query equals the single-query loop
    coords = torch.randint(0, Phi.shape[0], (50,), generator=torch.Generator().manual_seed(1)).tolist()
    mean_q = [loops.loop_val_mean(te_ex, names)]
    _close(
        loops.loop_rrinf_queries(ex, mean_q, names, coords, lr)[:, 0], loops.loop_rrinf(Phi, te_ex, names, coords, lr)
    )


def test_rrinf_loop_zero_row_step_is_pure_regulariser():
    tr, te = _sets()
    X = tr["b"].clone()
    X[:, 3] = 0.0
    tr = GradientSet({"a": tr["a"], "b": X})
    Phi = tr.matrix().T
    zero = tr.dims["a"] + 3
    te_ex = loops.example_dicts(te)
    n, D = tr.n, tr.dim
    lam = 0.1 * float(Phi.pow(2).mean())
    w1 = loops.loop_rrinf(Phi, te_ex, tr.names, [0], 0.05)
    w2 = loops.loop_rrinf(Phi, te_ex, tr.names, [0, zero], 0.05)
    _close(w2, (1 - 2 * 0.05 * n * lam / D) * w1)
