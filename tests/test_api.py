"""The public surface of the design's API.md exists, and every name the package exports resolves."""

import importlib
import re
from pathlib import Path

import pytest

import fastinf

API_MD = Path(__file__).resolve().parents[2] / "shared" / "design" / "API.md"

# Names API.md lists that later issues add; each must still be missing (so that this list is
# emptied as they land, and nothing here hides a name that exists).
PLANNED = {}

# Estimator and GradientSet members API.md promises (its code blocks name them on instances).
ESTIMATOR_METHODS = ("fit", "score", "self_influence", "topk")
GRADIENT_SET_MEMBERS = ("n", "names", "dims", "dim", "matrix", "to", "subset", "from_matrix", "from_dicts")
ESTIMATORS = ("HessianFree", "DiagonalFisher", "DataInf", "LiSSA", "RRInf", "RRInfFixedPoint", "Exact", "KFAC", "EKFAC")
EVAL_NAMES = ("mislabel_auc", "detection_curve", "class_detection", "agreement", "mislabel_experiment",
              "class_detection_experiment", "lds")  # fmt: skip
OPS = ("lora_per_sample_grads", "datainf_inverse_sum", "rrinf_row_updates", "trace_cov")
CANONICAL = ["hessian_free", "diagonal_fisher", "datainf", "lissa", "rrinf", "rrinf_fixed_point", "exact", "kfac",
             "ekfac", "z0inf", "bif"]  # fmt: skip


def resolve(dotted: str):
    """The object a dotted name refers to, importing submodules as needed; raises AttributeError/ImportError."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, p in enumerate(parts[1:], 1):
        if hasattr(obj, p):
            obj = getattr(obj, p)
        else:
            obj = importlib.import_module(".".join(parts[: i + 1]))
    return obj


def api_names() -> set[str]:
    if not API_MD.is_file():
        pytest.skip(f"{API_MD} not present (the design documents live beside the checkout)")
    text = API_MD.read_text(encoding="utf-8")
    names = set(re.findall(r"\bfastinf(?:\.[A-Za-z_][A-Za-z_0-9]*)+", text))
    names |= {f"fastinf.{e}" for e in ESTIMATORS}
    names |= {f"fastinf.eval.{e}" for e in EVAL_NAMES}
    names |= {f"fastinf.ops.{op}" for op in OPS} | {f"fastinf.ops.{op}_reference" for op in OPS}
    return names


def test_every_api_md_name_exists():
    missing = []
    for name in sorted(api_names()):
        if name in PLANNED:
            continue
        try:
            resolve(name)
        except (AttributeError, ImportError) as e:
            missing.append(f"{name} ({type(e).__name__})")
    assert not missing, f"API.md names missing from the package: {missing}"


@pytest.mark.parametrize("name", sorted(PLANNED))
def test_planned_names_are_really_missing(name):
    with pytest.raises((AttributeError, ImportError)):
        resolve(name)


def test_estimators_and_gradient_set_have_the_documented_members():
    for e in ESTIMATORS:
        cls = getattr(fastinf, e)
        for m in ESTIMATOR_METHODS:
            assert callable(getattr(cls, m, None)), f"{e}.{m}"
    for m in GRADIENT_SET_MEMBERS:
        assert hasattr(fastinf.GradientSet, m), m
    z = fastinf.Z0Inf()
    assert all(callable(getattr(z, m, None)) for m in ("fit", "score", "self_influence"))


def test_canonical_method_names():
    assert fastinf.available_methods() == CANONICAL
    assert set(fastinf.available_methods("gradients")) | set(fastinf.available_methods("traces")) == set(CANONICAL)
    assert fastinf.available_methods("traces") == ["z0inf", "bif"]


@pytest.mark.parametrize(
    "module", ["fastinf", "fastinf.eval", "fastinf.ops", "fastinf.estimators", "fastinf.gradients"]
)
def test_all_exports_resolve(module):
    mod = importlib.import_module(module)
    for name in getattr(mod, "__all__", []):
        assert hasattr(mod, name), f"{module}.__all__ names {name}, which does not exist"


def test_version_in_one_place():
    from fastinf.version import __version__

    assert fastinf.__version__ == __version__
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    declared = re.search(r'^version\s*=\s*"([^"]+)"', pyproject, re.M)
    dynamic = re.search(r"^dynamic\s*=.*version", pyproject, re.M)
    assert dynamic or (declared and declared.group(1) == __version__), "pyproject.toml and fastinf/version.py differ"
