"""Estimators on a GradientStore: every pass reads row chunks (never a whole (n, d_l) block), results equal the
in-memory path, passes are counted, low-precision stores are computed in float32, and the limits of the global
solves refuse with a clear message."""

import pytest
import torch
from conftest import make_blocks

import fastinf
from fastinf.gradients.store import GradientStore

ALL = ["hessian_free", "diagonal_fisher", "datainf", "lissa", "rrinf", "rrinf_fixed_point", "exact"]
OPTS = {"lissa": {"tol": 0.0, "depth": 20}, "rrinf": {"iters": 300}}
# name -> (method, options): the variants every test below runs
VARIANTS = {m: (m, OPTS.get(m, {})) for m in ALL} | {
    "exact_blockwise": ("exact", {"blockwise": True}),  # d-space per block (d_l < n)
    "exact_d": ("exact", {"solve": "d"}),
    "datainf_global": ("datainf", {"blockwise": False}),
    "lissa_global": ("lissa", {"tol": 0.0, "depth": 20, "blockwise": False}),
    "rrinf_minibatch": ("rrinf", {"iters": 100, "sampling": "minibatch", "batch_size": 3}),
}
DIMS = {"x.lora_A": 10, "x.lora_B": 6, "y.lora_A": 10, "y.lora_B": 6, "head": 4}  # D = 36 > n: exact picks n-space


def write_store(path, gs, *, dtype="float64", shard=5):
    st = GradientStore.create(path, {"blocks": gs.dims, "dtype": dtype})
    for s in range(0, gs.n, shard):
        st.append({k: gs[k][s : s + shard] for k in gs.names})
    st.mark_complete()
    return GradientStore.open(path)


@pytest.fixture
def problem(tmp_path):
    train, test = make_blocks(23, DIMS, seed=5), make_blocks(5, DIMS, seed=6)
    return train, test, write_store(tmp_path / "train", train)


@pytest.fixture
def chunk_reads(monkeypatch):
    """Fail on any whole-block read of a store; record the rows of every chunk read."""
    sizes = []
    orig = GradientStore.iter_chunks

    def iter_chunks(self, size, *, start=0, stop=None):
        for s, part in orig(self, size, start=start, stop=stop):
            sizes.append(part.n)
            yield s, part

    def whole(*a, **k):
        raise AssertionError("a whole block of the store was read")

    monkeypatch.setattr(GradientStore, "iter_chunks", iter_chunks)
    monkeypatch.setattr(GradientStore, "_read_block", whole)
    monkeypatch.setattr(GradientStore, "load", whole)
    return sizes


@pytest.mark.parametrize("variant", VARIANTS)
def test_store_equals_in_memory_and_reads_only_row_chunks(problem, chunk_reads, variant):
    train, test, store = problem
    method, opts = VARIANTS[variant]
    mem = fastinf.get_estimator(method, **opts).fit(train)
    est = fastinf.get_estimator(method, chunk_size=4, **opts).fit(store)
    close = dict(rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(est.score(test), mem.score(test), **close)
    for reduce in ("mean", "sum"):
        torch.testing.assert_close(est.score(test, reduce=reduce), mem.score(test, reduce=reduce), **close)
    v1, i1 = est.topk(test, 4)
    v2, i2 = mem.topk(test, 4)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(v1, v2, **close)
    torch.testing.assert_close(est.self_influence(), mem.self_influence(), **close)
    assert chunk_reads and max(chunk_reads) <= 4  # every read was a row chunk
    assert est.rows_ == (0, 23) and est.passes_ > 0


def _passes(est, *calls):
    out = [est.passes_]
    for c in calls:
        c()
        out.append(est.passes_)
    return out


@pytest.mark.parametrize(
    ("method", "opts", "expected"),
    [
        # (fit, + score(reduce="mean"), + topk, + self_influence): cumulative passes since fit
        ("hessian_free", {}, [0, 1, 2, 3]),
        ("diagonal_fisher", {}, [1, 2, 3, 4]),
        ("datainf", {"damping": 0.05}, [0, 2, 4, None]),  # fused pass + scoring pass
        # 'auto' λ: the store recorded its per-block sums of squares when written (no pass); in memory, one pass
        ("datainf", {}, {"store": [0, 2, 4, None], "memory": [1, 3, 5, None]}),
        ("exact", {"solve": "d"}, [1, 2, 3, 4]),
        ("lissa", {"damping": 0.05, "scale": 10.0, "tol": 0.0, "depth": 5}, [0, 6, 12, None]),
        ("lissa", {"tol": 0.0, "depth": 5, "power_iters": 7}, [7, 13, 19, None]),
        ("rrinf_fixed_point", {"solve": "d"}, [2, 3, 4, 5]),
        ("rrinf", {"iters": 50}, [1, 1, 1, 2]),
    ],
)
def test_passes_are_counted(problem, method, opts, expected):
    train, test, store = problem
    for kind, src in (("store", store), ("memory", train)):  # the same count in memory, but for the 'auto' λ
        exp = expected[kind] if isinstance(expected, dict) else expected
        est = fastinf.get_estimator(method, chunk_size=6, **opts).fit(src)
        calls = [lambda e=est: e.score(test, reduce="mean"), lambda e=est: e.topk(test, 3)]
        if exp[3] is not None:
            calls.append(est.self_influence)
        got = _passes(est, *calls)
        assert got == [e for e in exp if e is not None], (method, opts, kind)
        if method != "rrinf":  # rrinf reads once at fit and reuses the gathered coordinates
            assert est.rows_read_ == est.passes_ * train.n
        est.fit(src)
        assert est.passes_ == exp[0]  # fit resets the count


def test_datainf_mean_is_two_passes_of_the_whole_store(problem):
    train, test, store = problem
    est = fastinf.DataInf(damping=0.02, chunk_size=5).fit(store)
    assert est.passes_ == 0
    got = est.score(test, reduce="mean")
    assert est.passes_ == 2 and est.rows_read_ == 2 * train.n
    torch.testing.assert_close(got, fastinf.DataInf(damping=0.02).fit(train).score(test).mean(0))


U32 = 2.0**-24  # float32 unit roundoff


def test_datainf_auto_mean_is_two_passes_of_a_store_with_recorded_sums(tmp_path):
    """damping='auto' on a store that recorded Σ‖g‖² per block: fit reads nothing, score(reduce="mean") is the
    fused pass + the scoring pass. The scores equal the in-memory path (which spends a pass on λ) up to the λ
    difference, which comes only from summing the squares in float32 (in memory) vs float64 (the store).

    Tolerance, derived: in memory ‖g_i‖ is a float32 norm of d_l entries (relative error ≤ (d_l + 1)·u, u =
    2⁻²⁴), squared in float64, and a sum of positive terms keeps the relative bound, so
    δ_l = |λ_mem − λ_store| / λ_store ≤ 2(d_l + 1)·u. The DataInf score of block l is
    I_l(i) = −(1/λ)[tᵀg_i − (1/n) Σ_k (g_kᵀt)(g_kᵀg_i) / (λ + ‖g_k‖²)], and by Cauchy–Schwarz
    |I_l| ≤ 2‖t‖‖g_i‖/λ and |∂I_l/∂λ| ≤ (2 + 1/4)‖t‖‖g_i‖/λ², so a relative change δ_l of λ moves it by at most
    2.25·δ_l·‖t‖‖g_i‖/λ_l (3·δ_l with room for second order). With the same λ the two paths do the same float32
    arithmetic (checked: equal bit for bit); with different λ their float32 rounding differs by at most a few
    tens of u relative to the same scale B_i = Σ_l ‖t̄_l‖‖g_il‖/λ_l (128·u allowed). Hence
    |score_store − score_mem|_i ≤ Σ_l (3·δ_l + 128·u)·‖t̄_l‖‖g_il‖/λ_l."""
    train64, test = make_blocks(23, DIMS, seed=5), make_blocks(5, DIMS, seed=6)
    store = write_store(tmp_path / "s", train64, dtype="float32")
    train = store.load()  # the same float32 values, in memory
    opts = dict(form="streaming", chunk_size=4)
    est = fastinf.DataInf(**opts).fit(store)
    assert est.passes_ == 0 and est.rows_read_ == 0
    got = est.score(test, reduce="mean")
    assert est.passes_ == 2 and est.rows_read_ == 2 * train.n
    mem = fastinf.DataInf(**opts).fit(train)
    assert mem.passes_ == 1  # in memory: the pass for the 'auto' λ
    ref = mem.score(test, reduce="mean")
    assert mem.passes_ == 3
    # λ from the store: the exact float64 sums of the stored rows
    for k, d in DIMS.items():
        exact = 0.1 * float(train[k].double().square().sum()) / (train.n * d)
        assert abs(est.lambdas_[k] - exact) <= 1e-12 * exact
    delta = {k: abs(mem.lambdas_[k] - est.lambdas_[k]) / est.lambdas_[k] for k in DIMS}
    assert all(delta[k] <= 2 * (d + 1) * U32 for k, d in DIMS.items()), delta
    # the same λ: the same arithmetic, bit for bit
    same = fastinf.DataInf(**opts).fit(train)
    same.lam_ = dict(est.lam_)
    assert torch.equal(same.score(test, reduce="mean"), got)
    # different λ (float32 vs float64 sums): within the bound derived above
    tbar = test.mean()
    bound = sum(
        (3 * delta[k] + 128 * U32) * float(tbar[k].double().norm()) * train[k].double().norm(dim=1) / est.lambdas_[k]
        for k in DIMS
    )
    diff = (got.double() - ref.double()).abs()
    assert bool((diff <= bound).all()), float((diff / bound).max())
    # and the float64 in-memory path on the same values (no float32 sums at all) is as close
    ref64 = fastinf.DataInf(dtype=torch.float64, **opts).fit(train).score(test, reduce="mean")
    assert bool(((got.double() - ref64).abs() <= 2 * bound).all())


def test_an_older_store_without_recorded_sums_still_works(problem, tmp_path):
    """A store written before shards recorded their sums of squares: block_sq_sums() is None, and
    damping='auto' spends its pass again (3 passes for DataInf fit + score(reduce="mean")), same scores."""
    import json
    import shutil

    train, test, store = problem
    old = tmp_path / "old"
    shutil.copytree(store.path, old)
    man = json.loads((old / "manifest.json").read_text())
    for e in man["shards"]:
        del e["sq_sums"]
    (old / "manifest.json").write_text(json.dumps(man))
    st = GradientStore.open(old)
    assert st.block_sq_sums() is None and store.block_sq_sums() is not None
    est = fastinf.DataInf(chunk_size=5).fit(st)
    assert est.passes_ == 1
    got = est.score(test, reduce="mean")
    assert est.passes_ == 3 and est.rows_read_ == 3 * train.n
    ref = fastinf.DataInf().fit(train).score(test, reduce="mean")
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    new = fastinf.DataInf(chunk_size=5).fit(store)
    torch.testing.assert_close(new.score(test, reduce="mean"), got, rtol=1e-9, atol=1e-12)
    assert new.passes_ == 2 and new.lambdas_ == pytest.approx(est.lambdas_, rel=1e-12)


def test_recorded_sums_are_not_used_for_other_rows_or_values(problem, tmp_path):
    """Only the rows as stored seed λ: not a narrowing view, not a compute dtype that cannot hold them."""
    train, test, store = problem  # float64 store
    for est in (
        fastinf.DataInf(chunk_size=5).fit(store.to(dtype=torch.float32)),  # a narrowing view: other values
        fastinf.DataInf(chunk_size=5, dtype=torch.float32).fit(store),  # computed on float32-rounded rows
    ):
        assert est.passes_ == 1  # summed in the first pass, as in memory
    assert fastinf.DataInf(chunk_size=5).fit(store).passes_ == 0


def _datainf_ranks(path, test):
    from fastinf import distributed as fd

    est = fastinf.DataInf(chunk_size=4).fit(GradientStore.open(path))
    p0 = est.passes_
    mean = est.score(test, reduce="mean", gather=True)
    return fd.rank(), est.rows_, p0, est.passes_, est.lambdas_, mean.numpy()


def test_two_ranks_seed_lambda_from_the_store(problem):
    """Any rank split uses the store's global sums: every rank takes 0 passes at fit and 2 for the mean."""
    from fastinf.testing import run_distributed

    train, test, store = problem
    out = run_distributed(_datainf_ranks, str(store.path), test, world_size=2)
    ref_est = fastinf.DataInf().fit(train)
    ref = ref_est.score(test, reduce="mean")
    assert [o[1] for o in out] == [(0, 12), (12, 23)]
    for _, _, p0, p1, lams, mean in out:
        assert (p0, p1) == (0, 2)
        assert lams == pytest.approx(ref_est.lambdas_, rel=1e-12)
        torch.testing.assert_close(torch.from_numpy(mean), ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("method", ["hessian_free", "diagonal_fisher", "datainf", "exact"])
def test_low_precision_store_is_computed_in_float32_or_higher(tmp_path, method, dtype):
    train, test = make_blocks(23, DIMS, seed=5, scale=[1, 1, 1, 1, 1]), make_blocks(5, DIMS, seed=6)
    store = write_store(tmp_path / "s", train, dtype=dtype)
    assert store.dtype == getattr(torch, dtype)
    est = fastinf.get_estimator(method, chunk_size=4).fit(store)
    assert est.compute_dtype_ in (torch.float32, torch.float64)
    # the same stored values, widened to float64 in memory: only float32 accumulation error remains
    exact_values = store.to(dtype=torch.float64).iter_chunks(23).__next__()[1]
    ref = fastinf.get_estimator(method, dtype=torch.float64).fit(exact_values).score(test)
    got = est.score(test)
    assert got.dtype == est.compute_dtype_
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_exact_n_space_refused_on_a_store_beyond_the_budget(problem):
    train, test, store = problem
    budget = 8 * 23 * 23 - 1  # one byte short of the n×n Gram
    with pytest.raises(ValueError, match=r"solve='n' is not possible here: the n×n Gram.*Use solve='d'.*project"):
        fastinf.Exact(solve="n", memory_budget=budget).fit(store)
    est = fastinf.Exact(memory_budget=budget, chunk_size=4).fit(store)
    assert set(est.solves_.values()) == {"d"}  # 'auto' falls back to d-space
    torch.testing.assert_close(est.score(test), fastinf.Exact().fit(train).score(test), rtol=1e-8, atol=1e-12)
    # in memory on one process the n-space solve stays available
    assert set(fastinf.Exact(solve="n", memory_budget=budget).fit(train).solves_.values()) == {"n"}


def test_rrinf_limits_on_a_store(problem):
    train, test, store = problem
    with pytest.raises(ValueError, match=r"distinct coordinates drawn.*memory_budget.*rrinf_fixed_point"):
        fastinf.RRInf(iters=300, memory_budget=1000).fit(store)
    with pytest.raises(ValueError, match=r"sampling='layer' is not supported on a GradientStore"):
        fastinf.RRInf(sampling="layer").fit(store)
    fastinf.RRInf(iters=300, memory_budget=1000).fit(train)  # in memory: no limit (at most the set itself)


def test_datainf_limits(problem):
    train, test, store = problem
    with pytest.raises(ValueError, match=r"every pair of training examples.*pairwise_max_n = 10"):
        fastinf.DataInf(pairwise_max_n=10).fit(store).self_influence()
    with pytest.raises(ValueError, match=r"form='gram' needs every training gradient in memory"):
        fastinf.DataInf(form="gram").fit(store)
    with pytest.raises(ValueError, match="pairwise_max_n"):
        fastinf.DataInf(pairwise_max_n=0)


def test_new_options_are_validated():
    with pytest.raises(ValueError, match="memory_budget"):
        fastinf.HessianFree(memory_budget=0)
    with pytest.raises(ValueError, match="distributed"):
        fastinf.HessianFree(distributed="yes")
    # without a process group distributed=True is one rank of one
    est = fastinf.HessianFree(distributed=True).fit(torch.randn(5, 3))
    assert est.rows_ == (0, 5) and not est.distributed_
