"""BIF estimator (METHODS.md §8) against direct float64 covariance / correlation formulas."""

import numpy as np
import pytest
import torch

import fastinf
from fastinf import BIF, LossTrace

F64 = torch.float64


def traces(T=37, n=11, m=5, seed=0, dtype=F64, chains=None):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(T, 4, generator=g, dtype=F64)  # shared factors: correlated losses
    X = Z @ torch.randn(4, n, generator=g, dtype=F64) + torch.randn(T, n, generator=g, dtype=F64)
    Y = Z @ torch.randn(4, m, generator=g, dtype=F64) + 0.5 * torch.randn(T, m, generator=g, dtype=F64)
    X = X * torch.rand(n, generator=g, dtype=F64) * 3 + torch.randn(n, generator=g, dtype=F64) * 10
    Y = Y + 5.0
    rx = torch.rand(n, generator=g, dtype=F64) * 10
    ry = torch.rand(m, generator=g, dtype=F64) * 5
    ch = None if chains is None else torch.arange(chains).repeat_interleave(T // chains)
    return (
        LossTrace(X.to(dtype), chains=ch, reference=rx.to(dtype)),
        LossTrace(Y.to(dtype), chains=ch, reference=ry.to(dtype)),
    )


def direct(train, test, normalize):
    X, Y = train.losses.double().numpy(), test.losses.double().numpy()
    n = X.shape[1]
    full = np.corrcoef(np.concatenate([X, Y], 1).T) if normalize else np.cov(np.concatenate([X, Y], 1).T)
    return -torch.from_numpy(full[n:, :n])  # (m, n): −Cov(L_test_j, L_train_i)


@pytest.mark.parametrize("normalize", [False, True])
def test_score_matches_direct_formula(normalize):
    tr, te = traces(chains=1)
    got = BIF(normalize=normalize, backend="torch").fit(tr).score(te)
    assert got.shape == (5, 11) and got.dtype == F64
    torch.testing.assert_close(got, direct(tr, te, normalize), rtol=1e-10, atol=1e-12)
    # the default backend ("auto") against the direct formula, not against another fastinf result
    want = direct(tr, te, normalize)
    auto = BIF(normalize=normalize).fit(tr)
    torch.testing.assert_close(auto.score(te), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(auto.score(te, reduce="mean"), want.mean(0), rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour of explicit GPU backends")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_explicit_gpu_backend_on_cpu_traces_raises(backend):
    """An explicitly requested backend that cannot run raises, naming it; it never falls back silently."""
    tr, te = traces(chains=1)
    with pytest.raises(RuntimeError, match=backend):
        BIF(backend=backend).fit(tr).score(te)


def test_sign_co_moving_losses_are_helpful():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(50, generator=g, dtype=F64)
    X = torch.stack([a, -a, torch.randn(50, generator=g, dtype=F64)], 1)
    Y = (a + 0.1 * torch.randn(50, generator=g, dtype=F64))[:, None]
    s = BIF().fit(LossTrace(X)).score(LossTrace(Y))[0]
    assert s[0] < 0 < s[1]  # co-moving: negative = helpful; anti-moving: positive = harmful
    assert abs(float(s[2])) < abs(float(s[0]))


@pytest.mark.parametrize("block", [1, 7, 36, 37, 1000])
@pytest.mark.parametrize("normalize", [False, True])
def test_streaming_equals_two_pass(block, normalize):
    tr, te = traces()
    two_pass = direct(tr, te, normalize)
    got = BIF(normalize=normalize, block=block, backend="torch").fit(tr).score(te)
    torch.testing.assert_close(got, two_pass, rtol=1e-10, atol=1e-12)
    si = BIF(normalize=normalize, block=block).fit(tr).self_influence()
    torch.testing.assert_close(si, -torch.ones(11, dtype=F64) if normalize else -tr.losses.var(0), rtol=1e-10, atol=0)


def test_float32_traces_with_large_offset():
    """Losses ≈ 1000 ± 1e-3 in float32: one-pass Σxy − Nμμᵀ in float32 would lose every digit; with the
    reference subtracted and the pairwise merge the result matches float64 two-pass on the same values."""
    tr, te = traces(T=64)
    X = (1000 + 1e-3 * tr.losses / tr.losses.std(0)).float()
    Y = (1000 + 1e-3 * te.losses / te.losses.std(0)).float()
    ref_x, ref_y = torch.full((11,), 1000.0), torch.full((5,), 1000.0)
    t32, q32 = LossTrace(X, reference=ref_x), LossTrace(Y, reference=ref_y)
    want = direct(LossTrace(X.double()), LossTrace(Y.double()), False)
    for block in (1, 5, 256):
        got = BIF(block=block, backend="torch").fit(t32).score(q32)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-14)
    got = BIF(normalize=True, backend="torch").fit(LossTrace(X)).score(LossTrace(Y))  # no reference
    torch.testing.assert_close(
        got.double(), direct(LossTrace(X.double()), LossTrace(Y.double()), True), atol=1e-6, rtol=0
    )


def test_reference_does_not_change_scores():
    tr, te = traces()
    a = BIF(backend="torch").fit(tr).score(te)
    b = BIF(backend="torch").fit(LossTrace(tr.losses)).score(LossTrace(te.losses))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_registered():
    b = fastinf.get_estimator("bif", normalize=True)
    assert isinstance(b, BIF) and b.options.normalize


def test_topk_matches_score():
    tr, te = traces()
    b = BIF(backend="torch").fit(tr)
    s = b.score(te)
    v, i = b.topk(te, 3)
    torch.testing.assert_close(v, s.topk(3, dim=1).values)
    torch.testing.assert_close(torch.gather(s, 1, i), v)


def test_zero_variance_in_normalized_mode_raises():
    tr, te = traces()
    X = tr.losses.clone()
    X[:, 4] = 2.5
    with pytest.raises(ValueError, match="example 4 has zero variance"):
        BIF(normalize=True).fit(LossTrace(X))
    Y = te.losses.clone()
    Y[:, 2] = 1.0
    with pytest.raises(ValueError, match="zero variance"):
        BIF(normalize=True, backend="torch").fit(tr).score(LossTrace(Y))
    # plain covariance is fine (zero row / column)
    s = BIF(backend="torch").fit(LossTrace(X)).score(te)
    assert bool((s[:, 4] == 0).all())


def test_bad_inputs():
    tr, te = traces()
    with pytest.raises(ValueError, match="36 draws but the train trace has 37"):
        BIF().fit(tr).score(LossTrace(te.losses[:36]))
    with pytest.raises(ValueError, match="at least 2 draws"):
        BIF().fit(LossTrace(tr.losses[:1]))
    with pytest.raises(RuntimeError, match="not fitted"):
        BIF().score(te)
    with pytest.raises(TypeError, match="unknown option"):
        BIF(normalise=True)
    with pytest.raises(ValueError, match="block"):
        BIF(block=0)
    with pytest.raises(TypeError, match="LossTrace"):
        BIF().fit([[1.0, 2.0]])
    a = LossTrace(tr.losses, chains=torch.arange(37) % 2)
    b = LossTrace(te.losses, chains=torch.arange(37) % 3)
    with pytest.raises(ValueError, match="different chains"):
        BIF().fit(a).score(b)
    bad = tr.losses.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite value at checkpoint/draw 3, example 1"):
        LossTrace(bad)
