"""The package's import layers (ARCHITECTURE.md), checked statically: every module under fastinf/ is parsed
(``ast``), none is imported or run. Every import counts, the lazy ones inside functions and the
``TYPE_CHECKING`` ones included, and so does ``importlib.import_module("fastinf...")`` with a literal name.

(a) no import cycle between the package's parts (its subpackages and top-level modules);
(b) each part imports only its own layer or lower ones (LAYERS); ``data`` is a leaf used only by eval and cli;
(c) the backends (kernels/, _ext/) never import fastinf.ops;
(d) no module imports the package top level (``import fastinf``, ``from fastinf import X`` or ``from .. import X``
    where X is not a submodule): ``fastinf/__init__.py`` only re-exports, and holds nothing but imports.
"""

from __future__ import annotations

import ast
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PKG_DIR = Path(__file__).resolve().parents[1] / "fastinf"
TOP = "fastinf"

# part of the package (first name under fastinf) -> its layer; a module imports its own layer or lower ones
LAYERS: dict[str, int] = {
    "version": 0,  # leaves, importable by all
    "utils": 0,
    "distributed": 0,  # torch.distributed helpers (rank, row split, collectives); imports only torch
    "ops": 1,  # reference ops + dispatcher, with their backends
    "kernels": 1,
    "_ext": 1,
    "gradients": 2,
    "traces": 3,
    "estimators": 4,
    "compat": 5,
    "integrations": 5,
    "eval": 6,
    "testing": 6,  # tiny models for tests and bench (ARCHITECTURE.md's layout): nothing in the package uses it
    "cli": 7,
    "__main__": 7,
}
DATA = "data"  # a leaf (imports only itself and the rank-0 leaves) ...
DATA_USERS = {"eval", "cli"}  # ... used only by these parts
BACKENDS = {"kernels", "_ext"}  # (c): never import ops

# Known offenders, as (importing module, imported module) pairs that the rules above would reject, each one
# being removed by the CLI/eval split (eval/* and cli.py imported the package top level). Empty: the split has
# landed (8695f66). A pair added here needs its reason; one that no longer occurs only warns.
ALLOWED_VIOLATIONS: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class Import:
    importer: str  # module name, e.g. fastinf.gradients.store
    target: str  # the fastinf module it imports (the package itself: "fastinf")
    line: int


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    """True if ``name`` (dotted, under fastinf) is a module or package in the source tree."""
    rel = Path(*name.split(".")[1:]) if "." in name else Path()
    base = PKG_DIR / rel
    return name == TOP or base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _resolve_from(base: str, names: list[str]) -> Iterator[str]:
    """``from base import a, b``: each name that is a submodule of ``base``, else ``base`` itself."""
    for n in names:
        yield f"{base}.{n}" if n != "*" and _is_module(f"{base}.{n}") else base


def _imports(path: Path) -> Iterator[Import]:
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.split(".")[0] == TOP]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    raise AssertionError(f"{path}:{node.lineno}: relative import beyond the package")
                base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] == TOP:
                targets = list(_resolve_from(base, [a.name for a in node.names]))
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            if name in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.split(".")[0] == TOP:
                    targets = [arg.value]
        for t in targets:
            yield Import(mod, t, node.lineno)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG_DIR.rglob("*.py"))}


def _part(module: str) -> str:
    """The package part a module belongs to: ``fastinf.ops._dispatch`` -> ``ops``; the package itself -> ``""``."""
    return module.split(".")[1] if "." in module else ""


def _all_imports() -> list[Import]:
    return [i for p in _modules().values() for i in _imports(p)]


def _violations(imports: list[Import]) -> list[tuple[Import, str]]:
    out = []
    for i in imports:
        src, dst = _part(i.importer), _part(i.target)
        if src == "":  # fastinf/__init__.py: checked by test_package_init_only_reexports
            continue
        if not {src, dst} <= set(LAYERS) | {DATA, ""}:  # test_every_part_has_a_layer names them
            continue
        if i.target == TOP:
            out.append((i, "(d) imports the package top level; import the module that defines the name"))
            continue
        if src == dst:
            continue
        if src in BACKENDS and dst == "ops":
            out.append((i, "(c) a backend imports fastinf.ops; the dispatch table names the backends instead"))
        elif dst == DATA and src not in DATA_USERS:
            out.append((i, f"(b) only {sorted(DATA_USERS)} may use the data leaf"))
        elif src == DATA and LAYERS.get(dst, 99) > 0:
            out.append((i, "(b) the data leaf imports only itself and utils/version"))
        elif src != DATA and dst != DATA and LAYERS[dst] > LAYERS[src]:
            out.append((i, f"(b) layer {LAYERS[src]} ({src}) imports layer {LAYERS[dst]} ({dst})"))
    return out


def _format(found: list[tuple[Import, str]]) -> str:
    return "\n".join(f"  {i.importer} -> {i.target} (line {i.line}): {why}" for i, why in found)


# ------------------------------------------------------------------------------------------------ tests
def test_every_part_has_a_layer():
    parts = {_part(m) for m in _modules()} - {""}
    unknown = sorted(parts - set(LAYERS) - {DATA})
    assert not unknown, f"add {unknown} to LAYERS in tests/test_layers.py (and to ARCHITECTURE.md's layer list)"


def test_layers_are_respected():
    found = [(i, why) for i, why in _violations(_all_imports()) if (i.importer, i.target) not in ALLOWED_VIOLATIONS]
    assert not found, "imports against ARCHITECTURE.md's layers:\n" + _format(found)


def test_allowlist_is_current():
    """A pair that no longer occurs should leave ALLOWED_VIOLATIONS (a warning, so that the split can land first)."""
    seen = {(i.importer, i.target) for i, _ in _violations(_all_imports())}
    stale = sorted(ALLOWED_VIOLATIONS - seen)
    if stale:
        warnings.warn(
            f"tests/test_layers.py: ALLOWED_VIOLATIONS holds pairs that no longer occur: {stale}", stacklevel=1
        )


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _part_graph(imports: list[Import]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for i in imports:
        if (i.importer, i.target) in ALLOWED_VIOLATIONS:
            continue
        src, dst = _part(i.importer) or TOP, _part(i.target) or TOP
        if src != dst:
            edges.setdefault(src, set()).add(dst)
    return edges


def test_no_cycles_between_parts():
    cycles = _cycles(_part_graph(_all_imports()))
    assert not cycles, f"import cycles between parts of the package: {cycles}"


def test_package_init_only_reexports():
    tree = ast.parse((PKG_DIR / "__init__.py").read_text(encoding="utf-8"))
    for k, node in enumerate(tree.body):
        if k == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"]:
            continue
        pytest.fail(f"fastinf/__init__.py line {node.lineno}: only imports and __all__ belong there")


# ------------------------------------------------------------------------------- the checker catches things
@pytest.mark.parametrize(
    "importer, source, rule",
    [
        ("fastinf/kernels/_probe.py", "from ..ops import trace_cov\n", "(c)"),
        ("fastinf/_ext/_probe.py", "import importlib\nimportlib.import_module('fastinf.ops._dispatch')\n", "(c)"),
        ("fastinf/gradients/_probe.py", "from .. import __version__\n", "(d)"),
        ("fastinf/estimators/_probe.py", "def f():\n    from fastinf import GradientSet\n", "(d)"),
        ("fastinf/traces/_probe.py", "import fastinf\n", "(d)"),
        ("fastinf/ops/_probe.py", "from ..gradients import GradientSet\n", "(b) layer 1"),
        ("fastinf/gradients/_probe.py", "from fastinf.eval import metrics\n", "(b) layer 2"),
        ("fastinf/estimators/_probe.py", "from ..data import datasets\n", "(b) only"),
        ("fastinf/data/_probe.py", "from ..gradients import gradient_set\n", "(b) the data leaf"),
        ("fastinf/utils_probe.py", "", None),  # a new top-level module without a layer
    ],
)
def test_checker_rejects(importer, source, rule, tmp_path, monkeypatch):
    """The rules above on a copy of the package with one offending module added (the real tree is untouched)."""
    copy = tmp_path / "fastinf"
    shutil.copytree(PKG_DIR, copy, ignore=lambda d, names: [n for n in names if not n.endswith(".py") and "." in n])
    (tmp_path / importer).write_text(source)
    monkeypatch.setitem(globals(), "PKG_DIR", copy)
    if rule is None:
        with pytest.raises(AssertionError, match="add \\['utils_probe'\\] to LAYERS"):
            test_every_part_has_a_layer()
        return
    found = [(i, why) for i, why in _violations(_all_imports()) if i.importer.endswith("._probe")]
    assert len(found) == 1 and found[0][1].startswith(rule), _format(found)
    with pytest.raises(AssertionError):
        test_layers_are_respected()


def test_checker_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    # the cycle the dispatcher used to have: ops -> _ext -> ops
    edges = _part_graph(_all_imports())
    edges.setdefault("_ext", set()).add("ops")
    assert any({"_ext", "ops"} <= set(c) for c in _cycles(edges))
