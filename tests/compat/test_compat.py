"""Compat engines vs straightforward loop implementations of the reference engines' formulas."""

import numpy as np
import pandas as pd
import pytest
import torch

from fastinf.compat import datainf as cdi
from fastinf.compat import reference_loops as loops
from fastinf.compat import rrinf as crr

RTOL = 2e-4  # float32 engines vs float64 loops


def _dicts(n, seed, rank=3, width=8, with_head=True):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n):
        d = {
            "l0.lora_A.weight": torch.randn(rank, width, generator=g) * 0.1,
            "l0.lora_B.weight": torch.randn(rank, width, generator=g),  # stored transposed (r × out) like the refs
            "l1.lora_A.weight": torch.randn(rank, width, generator=g) * 0.01,
        }
        if with_head:
            d["head.weight"] = torch.randn(2, width, generator=g)
        out[i] = d
    return out


def _examples(d):
    """{id: {name: tensor}} -> the loops' list of per-example dicts, in float64."""
    return [{k: v.double() for k, v in d[i].items()} for i in range(len(d))]


def _loop_hvps(tr, v, c=10, n_iter=10):
    """identity / proposed / LiSSA / accurate hvps per tensor, per-example loops (float64)."""
    ex, n = _examples(tr), len(tr)
    out = {"identity": {}, "proposed": {}, "LiSSA": {}, "accurate": {}}
    for w, vw in v.items():
        vw = vw.double()
        lam = loops.loop_lambda(ex, w, 1.0 / c)
        out["identity"][w] = vw
        out["proposed"][w] = loops.loop_hvp_proposed(ex, vw, w, lam)
        out["LiSSA"][w] = loops.loop_hvp_lissa(ex, vw, w, lam, iters=n_iter)
        out["accurate"][w] = loops.loop_solve_accurate(loops.loop_outer_sum(ex, w, n), vw, lam, n)
    return out


def _loop_if(tr, hvp):
    return loops.loop_if(_examples(tr), hvp).numpy()


def _assert_close(a, b, rtol=RTOL):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    assert np.max(np.abs(a - b)) <= rtol * np.max(np.abs(b)), np.max(np.abs(a - b)) / np.max(np.abs(b))


def test_datainf_ifengine_matches_loop_formulas():
    tr, val = _dicts(12, 0), _dicts(5, 1)
    eng = cdi.IFEngine()
    eng.preprocess_gradients(tr, val, noise_index=[1, 2])
    eng.compute_hvps()
    eng.compute_IF()
    v = {w: sum(val[j][w] for j in val) / len(val) for w in val[0]}
    ref = _loop_hvps(tr, v)
    assert list(eng.IF_dict) == ["identity", "proposed", "LiSSA", "accurate"]
    for method in ref:
        for w in v:
            assert eng.hvp_dict[method][w].shape == v[w].shape
            _assert_close(eng.hvp_dict[method][w].numpy(), ref[method][w].numpy())
        out = eng.IF_dict[method]
        assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == (12,)
        _assert_close(out, _loop_if(tr, ref[method]))
        assert eng.time_dict[method] >= 0
    assert eng.n_train == 12 and eng.n_val == 5


def test_datainf_lissa_flag_switches_to_correct_recursion():
    tr, val = _dicts(6, 2), _dicts(3, 3)
    fixed = cdi.IFEngine(lissa_reference_compat=False)
    fixed.preprocess_gradients(tr, val, None)
    fixed.compute_hvp_LiSSA(n_iteration=5)
    quirky = cdi.IFEngine()
    quirky.preprocess_gradients(tr, val, None)
    quirky.compute_hvp_LiSSA(n_iteration=5)
    w = "l0.lora_B.weight"
    assert not torch.allclose(fixed.hvp_dict["LiSSA"][w], quirky.hvp_dict["LiSSA"][w])


def test_datainf_generation_engine_dataframe_orientation():
    tr, val = _dicts(9, 4), _dicts(4, 5)
    eng = cdi.IFEngineGeneration()
    eng.preprocess_gradients(tr, val)
    eng.compute_hvps()
    eng.compute_IF()
    for method in ("identity", "proposed"):
        df = eng.IF_dict[method]
        assert isinstance(df, pd.DataFrame) and df.shape == (4, 9)  # rows = validation, columns = training
        for j in range(4):
            ref = _loop_hvps(tr, val[j], n_iter=1)["identity" if method == "identity" else "proposed"]
            _assert_close(df.iloc[j].to_numpy(), _loop_if(tr, ref))
    assert set(eng.hvp_dict["proposed"]) == set(range(4))


def _loop_rrinf(tr, val_vecs, draws, lr=0.01, c=10, layer=False, names=None):
    """RRInf reference loop (n, m); val_vecs: list of dict (one per query column)."""
    names = names or list(tr[0].keys())
    queries = [{k: v[k].double() for k in names} for v in val_vecs]
    return loops.loop_rrinf_queries(_examples(tr), queries, names, draws, lr, layer=layer, factor=1.0 / c)


@pytest.mark.parametrize("layer", [False, True])
def test_rrinf_ifengine_replays_reference_rng(layer):
    tr, val = _dicts(10, 6), _dicts(4, 7)
    eng = crr.IFEngine()
    eng.preprocess_gradients(tr, val, None)
    names = list(val[0].keys())
    torch.manual_seed(123)
    np.random.seed(7)  # noqa: NPY002
    eng.compute_IF_RRInf(num_iterations=300, learning_rate=0.05, layer=layer)
    # the reference's draws after the same seeds
    torch.manual_seed(123)
    np.random.seed(7)  # noqa: NPY002
    if layer:
        order = list(names)
        np.random.shuffle(order)  # noqa: NPY002 (replays the reference global RNG)
        draws = [order[torch.randint(0, len(order), (1,)).item()] for _ in range(300)]
    else:
        draws = [torch.randint(0, eng.total_param_size, (1,)).item() for _ in range(300)]
    v = {w: sum(val[j][w] for j in val) / len(val) for w in names}
    ref = _loop_rrinf(tr, [v], draws, lr=0.05, layer=layer)[:, 0]
    out = eng.IF_dict["RRInf"]
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (10,)
    _assert_close(out, ref.numpy(), 1e-4)


def test_rrinf_ifengine_baselines_and_accurate():
    tr, val = _dicts(8, 8), _dicts(3, 9)
    eng = crr.IFEngine()
    eng.preprocess_gradients(tr, val, None)
    eng.compute_IF_baselines()  # compute_accurate=True works (the reference raises here)
    v = {w: sum(val[j][w] for j in val) / len(val) for w in val[0]}
    ref = _loop_hvps(tr, v)
    for key, refkey in [
        ("identity", "identity"),
        ("DataInf", "proposed"),
        ("LiSSA", "LiSSA"),
        ("accurate", "accurate"),
    ]:
        _assert_close(eng.IF_dict[key], _loop_if(tr, ref[refkey]))
        assert key in eng.time_dict
    assert eng.Phi.shape == (eng.total_param_size, 8)


def test_rrinf_generation_engine():
    tr, val = _dicts(7, 10), _dicts(3, 11)
    eng = crr.IFEngineGeneration()
    eng.preprocess_gradients(tr, val)
    eng.compute_IF_baselines()
    torch.manual_seed(5)
    eng.compute_IF_RRInf(num_iterations=200, layer=False)
    torch.manual_seed(5)
    draws = [torch.randint(0, eng.total_param_size, (1,)).item() for _ in range(200)]
    ref = _loop_rrinf(tr, [val[j] for j in range(3)], draws)
    df = eng.IF_dict["RRInf"]
    assert isinstance(df, pd.DataFrame) and df.shape == (3, 7)
    _assert_close(df.to_numpy(), ref.T.numpy(), 1e-4)
    for j in range(3):
        r = _loop_hvps(tr, val[j], n_iter=1)
        _assert_close(eng.IF_dict["identity"].iloc[j].to_numpy(), _loop_if(tr, r["identity"]))
        _assert_close(eng.IF_dict["DataInf"].iloc[j].to_numpy(), _loop_if(tr, r["proposed"]))


@pytest.mark.parametrize("layer", [False, True])
def test_rrinf_zero_rows_keep_the_regulariser(layer):
    """Zero rows (e.g. lora_A at init): zero data term, the step's regulariser still applies (METHODS.md §5).
    Strong damping makes the regulariser visible: skipping the whole step on a zero row (the old
    behaviour) differs from the loop by far more than float32 rounding."""
    tr, val = _dicts(6, 12), _dicts(2, 13)
    for i in tr:
        tr[i]["l0.lora_A.weight"][:, :5] = 0.0
        tr[i]["l1.lora_A.weight"][:] = 0.0  # a whole zero tensor
    names = list(val[0].keys())
    eng = crr.IFEngine()
    eng.preprocess_gradients(tr, val, None)
    torch.manual_seed(0)
    np.random.seed(3)  # noqa: NPY002
    eng.compute_IF_RRInf(num_iterations=400, learning_rate=0.2, lambda_const_param=0.1, layer=layer)
    torch.manual_seed(0)
    np.random.seed(3)  # noqa: NPY002
    if layer:
        order = list(names)
        np.random.shuffle(order)  # noqa: NPY002 (replays the reference global RNG)
        draws = [order[torch.randint(0, len(order), (1,)).item()] for _ in range(400)]
    else:
        draws = [torch.randint(0, eng.total_param_size, (1,)).item() for _ in range(400)]
    v = {w: sum(val[j][w] for j in val) / len(val) for w in names}
    ref = _loop_rrinf(tr, [v], draws, lr=0.2, c=0.1, layer=layer)[:, 0]
    out = eng.IF_dict["RRInf"]
    assert np.isfinite(out).all()
    _assert_close(out, ref.numpy(), 1e-4)


def test_bad_ids_rejected():
    tr = _dicts(3, 0)
    tr[5] = tr.pop(2)
    with pytest.raises(ValueError, match="0..n-1"):
        cdi.IFEngine().preprocess_gradients(tr, _dicts(2, 1), None)


def test_compat_uses_public_estimator_methods_only():
    """fastinf.compat reaches the estimators through their public surface only: no attribute of the form
    ``._name`` that an estimator class defines (``_test_side``, ``_prep_test``, ``_omega``, ...)."""
    import ast
    import pathlib

    import fastinf.compat
    from fastinf.estimators import BaseEstimator, available_methods, method_info

    private = set()
    for cls in [BaseEstimator] + [method_info(m).cls for m in available_methods()]:
        for klass in cls.__mro__:
            private |= {a for a in vars(klass) if a.startswith("_") and not a.startswith("__")}
    assert {"_test_side", "_prep_test", "_omega"} <= private
    used = {}
    for path in pathlib.Path(fastinf.compat.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in private:
                used.setdefault(path.name, set()).add(node.attr)
    assert not used, used
