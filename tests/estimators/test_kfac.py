"""K-FAC / EK-FAC (METHODS.md §11) against dense float64 formulas on tiny blocks, EK-FAC against the
exact block-wise influence where it is exact, streaming from a store, the API, errors and gloo ranks."""

import pytest
import torch

import fastinf
from fastinf import EKFAC, KFAC, Exact, GradientSet
from fastinf.testing import run_distributed

SHAPES = {"l0.lora_A": (3, 4), "l0.lora_B": (5, 3), "head.bias": (2, 1)}  # (d_out, d_in)


def _spd(d, g):
    M = torch.randn(d, d, generator=g, dtype=torch.float64)
    return M @ M.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def _problem(n=11, m=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = {"l0.lora_A": 1.0, "l0.lora_B": 0.1, "head.bias": 3.0}
    tr = {k: scales[k] * torch.randn(n, a * b, generator=g, dtype=torch.float64) for k, (a, b) in SHAPES.items()}
    te = {k: scales[k] * torch.randn(m, a * b, generator=g, dtype=torch.float64) for k, (a, b) in SHAPES.items()}
    factors = {k: (_spd(b, g), _spd(a, g)) for k, (a, b) in SHAPES.items()}  # (A: d_in, S: d_out)
    return GradientSet(tr, factors=factors), GradientSet(te), factors


def dense_scores(train, test, H_of, lam):
    """−Σ_l T_l (H_l + λ_l I)⁻¹ G_lᵀ, H_l built densely (D_l × D_l)."""
    out = torch.zeros(test.n, train.n, dtype=torch.float64)
    for k in train.names:
        H = H_of(k)
        out -= test[k] @ torch.linalg.solve(H + lam[k] * torch.eye(H.shape[0], dtype=torch.float64), train[k].T)
    return out


def test_kfac_equals_dense_kronecker_inverse():
    train, test, factors = _problem()
    lam = {"l0.lora_A": 0.3, "l0.lora_B": 0.02, "head.bias": 1.5}
    est = KFAC(damping=lam, dtype=torch.float64).fit(train)
    want = dense_scores(train, test, lambda k: torch.kron(factors[k][1], factors[k][0]), lam)  # S ⊗ A, row-major
    torch.testing.assert_close(est.score(test), want, rtol=1e-10, atol=1e-12)
    assert est.passes_ == 1  # fit reads no gradient; the score one pass
    # transposed Kronecker order (A ⊗ S) is a different matrix: the test could tell a wrong layout
    wrong = dense_scores(train, test, lambda k: torch.kron(factors[k][0], factors[k][1]), lam)
    assert float((wrong - want).abs().max()) > 1e-3 * float(want.abs().max())
    # 'auto': 0.1 × mean eigenvalue of S ⊗ A = 0.1 tr(S) tr(A) / (d_out d_in)
    auto = KFAC(dtype=torch.float64).fit(train)
    for k, (A, S) in factors.items():
        assert auto.lambdas_[k] == pytest.approx(
            0.1 * float(torch.trace(A) * torch.trace(S)) / (A.shape[0] * S.shape[0])
        )
    want = dense_scores(train, test, lambda k: torch.kron(factors[k][1], factors[k][0]), auto.lambdas_)
    torch.testing.assert_close(auto.score(test), want, rtol=1e-10, atol=1e-12)


def _ekfac_dense(train, factors, k):
    A, S = factors[k]
    _, QA = torch.linalg.eigh(A)
    _, QS = torch.linalg.eigh(S)
    Q = torch.kron(QS, QA)  # row-major vec(Q_Sᵀ G Q_A) = Qᵀ vec(G)
    lam_eig = ((train[k] @ Q) ** 2).mean(0)
    return Q @ torch.diag(lam_eig) @ Q.T, lam_eig


def test_ekfac_equals_dense_in_kronecker_eigenbasis():
    train, test, factors = _problem(seed=1)
    est = EKFAC(dtype=torch.float64, chunk_size=4).fit(train)
    assert est.passes_ == 1  # the eigenvalue correction: one streamed pass
    lam = {}
    for k in train.names:
        _, ev = _ekfac_dense(train, factors, k)
        lam[k] = 0.1 * float(ev.mean())  # kronfluence's heuristic on the corrected eigenvalues
        torch.testing.assert_close(est.eigenvalues_[k].reshape(-1).sort().values, ev.sort().values, rtol=1e-10, atol=0)
        assert est.lambdas_[k] == pytest.approx(lam[k], rel=1e-12)
    want = dense_scores(train, test, lambda k: _ekfac_dense(train, factors, k)[0], lam)
    torch.testing.assert_close(est.score(test), want, rtol=1e-9, atol=1e-12)
    # K-FAC's eigenvalues are not these: EK-FAC scores differ from K-FAC's at the same λ
    kf = KFAC(damping=lam, dtype=torch.float64).fit(train).score(test)
    assert float((kf - want).abs().max()) > 1e-2 * float(want.abs().max())


def _orth(d, g):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


def test_ekfac_equals_exact_blockwise_when_gradients_are_diagonal_in_a_kronecker_basis():
    g = torch.Generator().manual_seed(5)
    n, m = 40, 3
    blocks, tests, factors = {}, {}, {}
    for k, (d_out, d_in) in SHAPES.items():
        QS, QA = _orth(d_out, g), _orth(d_in, g)
        a = torch.arange(1, d_in + 1, dtype=torch.float64)  # distinct: the eigenbasis is determined
        s = torch.arange(1, d_out + 1, dtype=torch.float64) * 0.7
        factors[k] = (QA @ torch.diag(a) @ QA.T, QS @ torch.diag(s) @ QS.T)
        rows = []
        for _ in range(n):  # G_i = Q_S (c e_j e_kᵀ) Q_Aᵀ: one Kronecker basis element each
            E = torch.zeros(d_out, d_in, dtype=torch.float64)
            E[torch.randint(d_out, (1,), generator=g), torch.randint(d_in, (1,), generator=g)] = torch.randn(
                1, generator=g, dtype=torch.float64
            )
            rows.append((QS @ E @ QA.T).reshape(-1))
        blocks[k] = torch.stack(rows)
        tests[k] = torch.randn(m, d_out * d_in, generator=g, dtype=torch.float64)
    train = GradientSet(blocks, factors=factors)
    test = GradientSet(tests)
    lam = 0.05
    ek = EKFAC(damping=lam, dtype=torch.float64).fit(train).score(test)
    ex = Exact(damping=lam, blockwise=True, dtype=torch.float64).fit(train).score(test)
    torch.testing.assert_close(ek, ex, rtol=1e-9, atol=1e-12)
    kf = KFAC(damping=lam, dtype=torch.float64).fit(train).score(test)
    assert float((kf - ex).abs().max()) > 1e-2 * float(ex.abs().max())  # K-FAC is not exact here


def test_api_store_streaming_and_reduce(tmp_path):
    train, test, factors = _problem(n=13, seed=2)
    for cls in (KFAC, EKFAC):
        est = cls(dtype=torch.float64, chunk_size=5).fit(train)
        full = est.score(test)
        torch.testing.assert_close(est.score(test, reduce="mean"), full.mean(0), rtol=1e-12, atol=1e-14)
        v, i = est.topk(test, 3)
        torch.testing.assert_close(v, full.topk(3, dim=1).values)
        assert torch.equal(i, full.topk(3, dim=1).indices)
        self_inf = est.self_influence()
        torch.testing.assert_close(self_inf, est.score(train).diagonal(), rtol=1e-10, atol=1e-12)
        # explicit factors= on a set without factors: the same scores
        bare = GradientSet(train.blocks())
        torch.testing.assert_close(cls(dtype=torch.float64, factors=factors).fit(bare).score(test), full)
        # fastinf.influence / the registry
        torch.testing.assert_close(fastinf.influence(train, test, cls.name, dtype=torch.float64), full)
    assert fastinf.method_info("ekfac").uses_damping and "kfac" in fastinf.available_methods()


def test_errors_name_the_block():
    train, test, factors = _problem()
    bare = GradientSet(train.blocks())
    with pytest.raises(ValueError, match=r"no Kronecker factors for block 'l0.lora_A'.*factors=True"):
        EKFAC().fit(bare)
    with pytest.raises(ValueError, match="head.bias"):
        KFAC(factors={k: v for k, v in factors.items() if k != "head.bias"}).fit(bare)
    with pytest.raises(ValueError, match=r"'l0.lora_B'.*width"):
        KFAC(factors={**factors, "l0.lora_B": (torch.eye(2), torch.eye(5))}).fit(bare)
    with pytest.raises(ValueError, match="head.bias"):
        KFAC(damping={"l0.lora_A": 1.0, "l0.lora_B": 1.0}).fit(train)
    with pytest.raises(ValueError, match="damping"):
        KFAC(damping=-1.0)
    zero = GradientSet({k: torch.zeros_like(v) for k, v in train.items()}, factors=factors)
    with pytest.raises(ValueError, match="λ = 0"):
        EKFAC().fit(zero)


def test_store_equals_memory(tmp_path):
    train, test, factors = _problem(n=9, seed=3)
    fp = {"blocks": train.dims, "dtype": "float64", "factors": True}
    st = fastinf.GradientStore.create(tmp_path / "s", fp, shard_bytes=1)
    from fastinf.gradients.factors import normalise

    # per-shard sums that normalise to the factors: xx = A·tokens, dd = S·n_rows spread over 3 shards
    for s in range(3):
        rows = {k: v[3 * s : 3 * s + 3] for k, v in train.items()}
        sums = {
            k: {"xx": A * 2.0, "dd": S * 3.0, "tokens": torch.full((1, 1), 2.0, dtype=torch.float64)}
            for k, (A, S) in factors.items()
        }
        st.append(rows, data_sha256=f"{s}", factors=sums)
    st.mark_complete()
    st = fastinf.GradientStore.open(tmp_path / "s")
    for k, (A, S) in normalise(
        {k: {"xx": A, "dd": S, "tokens": torch.ones(1, 1)} for k, (A, S) in factors.items()}, 1
    ).items():
        torch.testing.assert_close(st.factors[k][0], A)
        torch.testing.assert_close(st.factors[k][1], S)
    for cls in (KFAC, EKFAC):
        a = cls(dtype=torch.float64, chunk_size=2).fit(st)
        b = cls(dtype=torch.float64).fit(train)
        torch.testing.assert_close(a.score(test), b.score(test), rtol=1e-12, atol=1e-14)


def _dist_ekfac(seed):
    train, test, _ = _problem(n=13, seed=seed)
    est = EKFAC(dtype=torch.float64, chunk_size=3).fit(train)
    return (
        est.rows_,
        {k: v.numpy() for k, v in est.eigenvalues_.items()},
        est.score(test, gather=True).numpy(),
    )


def test_distributed_ekfac_all_reduces_eigenvalues():
    train, test, _ = _problem(n=13, seed=4)
    ref = EKFAC(dtype=torch.float64).fit(train)
    out = run_distributed(_dist_ekfac, 4, world_size=2)
    assert [o[0] for o in out] == [(0, 7), (7, 13)]  # each rank read its own rows
    for _, ev, sc in out:
        for k, v in ev.items():
            torch.testing.assert_close(torch.from_numpy(v), ref.eigenvalues_[k], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(torch.from_numpy(sc), ref.score(test), rtol=1e-10, atol=1e-13)
