"""Estimators on 2 gloo processes: the training rows of a GradientStore are split over the ranks (each reads only
its own rows), fit statistics are all-reduced, top-k is merged, and scores / top-k / self-influence equal the
one-process run (computed here, in the parent, on the in-memory set)."""

import pytest
import torch
from conftest import make_blocks

import fastinf
from fastinf.gradients.store import GradientStore
from fastinf.testing import run_distributed

N, DIMS = 29, {"a.lora_A": 6, "a.lora_B": 4, "b.lora_A": 5, "head": 3}  # D = 18 < n: exact in d-space
VARIANTS = {
    "hessian_free": ("hessian_free", {}),
    "diagonal_fisher": ("diagonal_fisher", {}),
    "diagonal_fisher_blockwise": ("diagonal_fisher", {"blockwise": True}),
    "datainf": ("datainf", {}),
    "datainf_global": ("datainf", {"blockwise": False, "damping": 0.03}),
    "lissa": ("lissa", {"tol": 0.0, "depth": 15}),
    "exact": ("exact", {}),
    "exact_blockwise": ("exact", {"blockwise": True}),
    "rrinf_fixed_point": ("rrinf_fixed_point", {}),
    "rrinf": ("rrinf", {"iters": 200}),  # not split: every rank computes the whole result
}


def _results(est, test, self_influence=True):
    v, i = est.topk(test, 4)
    out = {"full": est.score(test, gather=True), "mean": est.score(test, reduce="mean", gather=True), "topv": v}
    out["topi"] = i
    if self_influence:
        out["self"] = est.self_influence(gather=True)
    return out


def _plain(x):
    """Tensors -> numpy (torch's queue would pass tensors as shared memory that dies with the child)."""
    if isinstance(x, torch.Tensor):
        return x.numpy()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def _torch(x):
    if isinstance(x, dict):
        return {k: _torch(v) for k, v in x.items()}
    return torch.from_numpy(x) if hasattr(x, "__array__") and not isinstance(x, (list, tuple)) else x


def _ranks(path, test):
    """One rank: every variant on the shared store; records which rows each rank read."""
    from fastinf import distributed as fd

    reads = []
    orig = GradientStore.iter_chunks

    def iter_chunks(self, size, *, start=0, stop=None):
        for s, part in orig(self, size, start=start, stop=stop):
            reads.append((s, s + part.n))
            yield s, part

    GradientStore.iter_chunks = iter_chunks
    store = GradientStore.open(path)
    out = {"rank": fd.rank(), "world": fd.world_size()}
    for name, (method, opts) in VARIANTS.items():
        est = fastinf.get_estimator(method, chunk_size=4, **opts).fit(store)
        local = est.score(test)
        reads.clear()
        p0 = est.passes_
        # DataInf's self-influence pairs every row with every other (it reads all n rows on each rank)
        res = _results(est, test, self_influence=method != "datainf")
        res["local_reads"], res["local_passes"] = list(reads), est.passes_ - p0
        if method == "datainf":
            res["self"] = est.self_influence(gather=True)
        res.update(rows=est.rows_, local=local, distributed=est.distributed_, passes=est.passes_)
        res["local_self"] = est.self_influence()
        out[name] = res
    try:
        fastinf.Exact(solve="n").fit(store)
        out["exact_n"] = None
    except ValueError as e:
        out["exact_n"] = str(e)
    try:
        fastinf.RRInf(distributed=True).fit(store)
        out["rrinf_true"] = None
    except ValueError as e:
        out["rrinf_true"] = str(e)
    return _plain(out)


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory):
    train, test = make_blocks(N, DIMS, seed=11), make_blocks(3, DIMS, seed=12)
    path = tmp_path_factory.mktemp("dist") / "train"
    st = GradientStore.create(path, {"blocks": train.dims, "dtype": "float64"})
    for s in range(0, N, 7):
        st.append({k: train[k][s : s + 7] for k in train.names})
    st.mark_complete()
    return train, test, [_torch(o) for o in run_distributed(_ranks, str(path), test, world_size=2)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_ranks_equal_one_process(distributed_run, variant):
    train, test, out = distributed_run
    method, opts = VARIANTS[variant]
    ref_est = fastinf.get_estimator(method, **opts).fit(train)  # one process, in memory
    ref = _results(ref_est, test)
    close = dict(rtol=1e-9, atol=1e-12)
    split = method != "rrinf"
    assert [o["rank"] for o in out] == [0, 1] and all(o["world"] == 2 for o in out)
    for o in out:
        got = o[variant]
        assert got["distributed"] is split
        for key in ("full", "mean", "topv", "self"):
            torch.testing.assert_close(got[key], ref[key], **close, msg=f"{variant} {key}")
        assert torch.equal(got["topi"], ref["topi"])
        a, b = got["rows"]
        assert (a, b) == ((0, 15) if o["rank"] == 0 else (15, 29)) if split else (0, N)
        torch.testing.assert_close(got["local"], ref["full"][:, a:b], **close)
        torch.testing.assert_close(got["local_self"], ref["self"][a:b], **close)
        # each rank read only its own rows (score, mean, topk and self-influence; rrinf reuses its fit-time rows)
        assert all(a <= s < e <= b for s, e in got["local_reads"]), got["local_reads"]
        if split:
            assert sum(e - s for s, e in got["local_reads"]) == got["local_passes"] * (b - a) > 0


def test_refusals_under_distribution(distributed_run):
    _, _, out = distributed_run
    for o in out:
        assert "rows are split over ranks" in o["exact_n"] and "solve='d'" in o["exact_n"]
        assert "distributed=True is not supported" in o["rrinf_true"]
