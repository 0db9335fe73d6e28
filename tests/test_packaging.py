"""pyproject.toml declares what fastinf imports, and the requirements files pin it.

Static: the imports are read off every module's AST (none is imported), so ``pip install fastinf`` followed
by ``fastinf.GradientStore`` cannot fail on an undeclared import again.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11
Requirement = pytest.importorskip("packaging.requirements").Requirement

ROOT = Path(__file__).resolve().parents[1]
PKG_DIR = ROOT / "fastinf"

# import name -> distribution name, where they differ
DISTRIBUTION = {"sklearn": "scikit-learn", "PIL": "pillow", "yaml": "pyyaml", "cv2": "opencv-python"}

# The parts that ``import fastinf`` and the library API (gradients, GradientStore, estimators, ops, traces,
# compat) use: what they import, even lazily inside a function, must be a core dependency unless it is listed
# in OPTIONAL_IN_CORE with the reason it cannot be needed without the extra.
CORE_PARTS = {"ops", "kernels", "_ext", "gradients", "traces", "estimators", "compat", "utils", "version", ""}
OPTIONAL_IN_CORE = {
    "triton": "the Triton backend: imported only when an op runs on a CUDA device with triton installed",
    "transformers": "called only on transformers models, which the caller already has",
    "peft": "called only on peft-wrapped models, which the caller already has",
    "diffusers": "called only on diffusers models, which the caller already has",
}
# declared but never imported by name: needed by another dependency at run time
NOT_IMPORTED = {"accelerate": "transformers.Trainer (the experiments, CheckpointCallback) needs it"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _third_party(path: Path) -> Iterator[str]:
    """Top-level names of the absolute non-stdlib, non-fastinf imports of one file (lazy ones included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            fn = node.func
            called = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        for n in names:
            top = n.split(".")[0]
            if top and top not in sys.stdlib_module_names and top not in ("fastinf", "__future__"):
                yield top


def _imports() -> dict[str, set[str]]:
    """distribution (normalised) -> the fastinf parts that import it."""
    out: dict[str, set[str]] = {}
    for p in sorted(PKG_DIR.rglob("*.py")):
        rel = p.relative_to(PKG_DIR).with_suffix("").parts
        part = "" if rel == ("__init__",) else rel[0]
        for top in _third_party(p):
            out.setdefault(_norm(DISTRIBUTION.get(top, top)), set()).add(part)
    return out


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _reqs(specs: list[str]) -> dict[str, Requirement]:
    return {_norm(r.name): r for r in map(Requirement, specs)}


def _core() -> dict[str, Requirement]:
    return _reqs(_project()["dependencies"])


def _extras() -> dict[str, dict[str, Requirement]]:
    return {k: _reqs(v) for k, v in _project()["optional-dependencies"].items()}


def _pins(*files: str) -> dict[str, str]:
    """distribution -> pinned version, from requirements files (``name==version`` lines)."""
    pins = {}
    for f in files:
        for line in (ROOT / f).read_text(encoding="utf-8").splitlines():
            line = line.split("#")[0].strip()
            if line:
                r = Requirement(line)
                spec = [s for s in r.specifier if s.operator == "=="]
                assert spec, f"{f}: {line!r} is not pinned with =="
                pins[_norm(r.name)] = spec[0].version
    return pins


# ------------------------------------------------------------------------------------------------ tests
def test_every_import_is_declared():
    declared = set(_core()).union(*_extras().values())
    missing = {d: sorted(parts) for d, parts in _imports().items() if d not in declared}
    assert not missing, (
        f"fastinf imports {missing} (distribution: importing parts) but pyproject.toml declares them neither in "
        "dependencies nor in an extra (map import names to distributions in DISTRIBUTION)"
    )


def test_the_library_needs_only_core_dependencies():
    core = set(_core())
    need = {d: sorted(p & CORE_PARTS) for d, p in _imports().items() if p & CORE_PARTS}
    bad = {d: parts for d, parts in need.items() if d not in core and d not in OPTIONAL_IN_CORE}
    assert not bad, f"the library layers import {bad}, which `pip install fastinf` does not install"
    for d in OPTIONAL_IN_CORE:
        assert any(d in deps for deps in _extras().values()), f"{d} is optional in the core but in no extra"


def test_every_declared_dependency_is_used():
    imported = set(_imports())
    declared = set(_core()).union(*(deps for name, deps in _extras().items() if name != "dev"))
    unused = sorted(declared - imported - set(NOT_IMPORTED))
    assert not unused, f"pyproject.toml declares {unused}, which nothing in fastinf imports (drop them)"
    assert "psutil" not in declared


def test_torch_is_a_loose_lower_bound():
    torch = _core()["torch"]
    ops = {s.operator for s in torch.specifier}
    assert ops == {">="}, f"torch must stay a lower bound in pyproject.toml (the Makefile pins it), got {torch}"


def test_requirements_pin_every_dependency():
    """requirements.txt pins every runtime dependency (the data extra's packages: requirements-data.txt, installed
    --no-deps), requirements-dev.txt the dev tools; a version pinned in an extra is the requirements' pin."""
    runtime = _pins("requirements.txt")
    data = _pins("requirements-data.txt")
    dev = _pins("requirements-dev.txt")
    extras = _extras()
    for name, deps in [("dependencies", _core())] + sorted(extras.items()):
        pins = dev if name == "dev" else {**data, **runtime} if name == "data" else runtime
        for dist, req in deps.items():
            assert dist in pins, f"pyproject [{name}] {req} is not pinned in the requirements files"
            assert req.specifier.contains(pins[dist]), f"pyproject [{name}] {req} excludes the pinned {pins[dist]}"
            exact = [s.version for s in req.specifier if s.operator == "=="]
            assert not exact or exact == [pins[dist]], f"pyproject [{name}] {req} != requirements pin {pins[dist]}"


def test_the_checker_maps_and_finds(tmp_path, monkeypatch):
    """A module importing an undeclared package (and sklearn under its distribution name) is caught."""
    (tmp_path / "fastinf" / "estimators").mkdir(parents=True)
    (tmp_path / "fastinf" / "estimators" / "new.py").write_text(
        "import os\nfrom sklearn import metrics\n\ndef f():\n    import statsmodels.api\n"
    )
    monkeypatch.setitem(globals(), "PKG_DIR", tmp_path / "fastinf")
    assert _imports() == {"scikit-learn": {"estimators"}, "statsmodels": {"estimators"}}
    with pytest.raises(AssertionError, match="statsmodels"):
        test_every_import_is_declared()
    with pytest.raises(AssertionError, match="scikit-learn"):
        test_the_library_needs_only_core_dependencies()
