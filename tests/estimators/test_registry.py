"""Method facts in the registry (input kind, damping, seed) and the shared estimator protocol."""

import dataclasses

import pytest
import torch
from conftest import make_blocks

import fastinf
from fastinf import LossTrace
from fastinf.estimators import (
    BaseEstimator,
    Estimator,
    MethodInfo,
    TraceEstimator,
    available_methods,
    get_estimator,
    method_info,
)

# the facts, written from METHODS.md / API.md (not read back from the classes)
FACTS = {
    #                    input_kind,  uses_damping, stochastic
    "hessian_free": ("gradients", False, False),
    "diagonal_fisher": ("gradients", True, False),
    "datainf": ("gradients", True, False),
    "lissa": ("gradients", True, False),
    "rrinf": ("gradients", True, True),
    "rrinf_fixed_point": ("gradients", True, False),
    "exact": ("gradients", True, False),
    "kfac": ("gradients", True, False),
    "ekfac": ("gradients", True, False),
    "z0inf": ("traces", False, False),
    "bif": ("traces", False, False),
}
CANONICAL = list(FACTS)


def test_available_methods_order_and_filter():
    assert available_methods() == CANONICAL
    assert available_methods(None) == CANONICAL
    assert available_methods("gradients") == CANONICAL[:9]
    assert available_methods("traces") == ["z0inf", "bif"]
    assert fastinf.available_methods() == CANONICAL
    with pytest.raises(ValueError, match="input_kind"):
        available_methods("losses")


@pytest.mark.parametrize("name", CANONICAL)
def test_method_info_facts(name):
    info = method_info(name)
    assert isinstance(info, MethodInfo)
    assert (info.input_kind, info.uses_damping, info.stochastic) == FACTS[name]
    assert info.name == name and info.cls is type(get_estimator(name))
    assert info.options == tuple(f.name for f in dataclasses.fields(info.cls.Options))
    assert ("damping" in info.options) == (info.input_kind == "gradients")
    assert ("seed" in info.options) == (name in ("lissa", "rrinf"))  # LiSSA's seed only starts the power iteration
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.stochastic = not info.stochastic


def test_method_info_names_and_errors():
    assert method_info(" RRInf-Fixed-Point ").name == "rrinf_fixed_point"
    with pytest.raises(ValueError, match="unknown method"):
        method_info("kronfluence")


def test_one_protocol_for_both_bases():
    assert issubclass(Estimator, BaseEstimator) and issubclass(TraceEstimator, BaseEstimator)
    from fastinf.estimators.bif import TraceEstimator as FromBif

    assert FromBif is TraceEstimator
    for name in CANONICAL:
        cls = method_info(name).cls
        base = Estimator if FACTS[name][0] == "gradients" else TraceEstimator
        assert issubclass(cls, base)
        for attr in ("fit", "score", "topk", "self_influence"):
            assert callable(getattr(cls, attr))
        r = repr(get_estimator(name))
        assert r.startswith(cls.__name__ + "(") and "Options(" in r


# ----------------------------------------------------------------------------------- the facts are true
@pytest.fixture
def grads():
    dims = {"a": 6, "b": 4}
    return make_blocks(9, dims, seed=1), make_blocks(3, dims, seed=2)


@pytest.mark.parametrize("name", available_methods("gradients"))
def test_uses_damping_means_the_scores_depend_on_lambda(grads, name):
    train, test = grads
    opts = {"tol": 0.0, "depth": 30} if name == "lissa" else {}
    if name in ("kfac", "ekfac"):  # Kronecker factors of a (6 = 2 × 3) and b (4 = 2 × 2) blocks
        opts = {"factors": {"a": (torch.eye(3), torch.eye(2)), "b": (torch.eye(2), torch.eye(2))}}
    a = get_estimator(name, damping=0.05, **opts).fit(train).score(test)
    b = get_estimator(name, damping=0.5, **opts).fit(train).score(test)
    assert (not torch.allclose(a, b, rtol=1e-6, atol=0)) == FACTS[name][1]


@pytest.mark.parametrize("name", ["lissa", "rrinf"])
def test_stochastic_means_the_scores_depend_on_the_seed(grads, name):
    train, test = grads
    # LiSSA's seed only starts the power iteration of the scale; converged, the result does not depend on it
    opts = {"tol": 1e-10, "depth": 100000, "damping": 0.5} if name == "lissa" else {}
    a = get_estimator(name, seed=0, **opts).fit(train).score(test)
    b = get_estimator(name, seed=1, **opts).fit(train).score(test)
    same = torch.allclose(a, b, rtol=1e-8, atol=0)
    assert same != FACTS[name][2]


def _traces():
    g = torch.Generator().manual_seed(0)
    theta = torch.cumsum(torch.randn(8, 5, generator=g, dtype=torch.float64), 0)
    return (
        LossTrace(torch.randn(8, 6, generator=g, dtype=torch.float64), theta @ theta.T),
        LossTrace(torch.randn(8, 3, generator=g, dtype=torch.float64)),
    )


@pytest.mark.parametrize("name", available_methods("traces"))
def test_trace_methods_share_score_reduce_and_topk(name):
    train, test = _traces()
    est = get_estimator(name).fit(train)
    full = est.score(test)
    assert full.shape == (3, 6)
    torch.testing.assert_close(est.score(test, reduce="mean"), full.mean(0))
    torch.testing.assert_close(est.score(test, reduce="sum"), full.sum(0))
    with pytest.raises(ValueError, match="reduce"):
        est.score(test, reduce="max")
    v, i = est.topk(test, 2, largest=False)
    assert torch.equal(i, torch.topk(full, 2, dim=1, largest=False).indices)
    with pytest.raises(ValueError, match="k must be"):
        est.topk(test, 7)
    assert est.self_influence().shape == (6,)
    with pytest.raises(TypeError, match="unknown option"):
        get_estimator(name, damping=0.1)
