"""The estimator registry: canonical method names and each method's facts (:class:`MethodInfo`:
input kind, whether it uses damping, whether it depends on a seed), :func:`get_estimator` and the
one-call :func:`influence`. Estimator classes join it with :func:`register`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ..gradients.gradient_set import GradientSet
    from .base import BaseEstimator

INPUT_KINDS = ("gradients", "traces")

_REGISTRY: dict[str, type[BaseEstimator]] = {}


def register(cls: type[BaseEstimator]) -> type[BaseEstimator]:
    """Class decorator: make an estimator reachable by its canonical ``name``.

    Checks that the class states its facts: a non-empty ``name``, ``input_kind`` in
    :data:`INPUT_KINDS`, boolean ``uses_damping`` / ``stochastic``, and a dataclass ``Options``.
    """
    if not cls.name:
        raise TypeError(f"{cls.__name__}: an estimator needs a non-empty class attribute 'name'")
    if cls.input_kind not in INPUT_KINDS:
        raise TypeError(f"{cls.__name__}: input_kind must be one of {INPUT_KINDS}, got {cls.input_kind!r}")
    if not isinstance(cls.uses_damping, bool) or not isinstance(cls.stochastic, bool):
        raise TypeError(f"{cls.__name__}: uses_damping and stochastic must be bools")
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"{cls.__name__}: Options must be a dataclass")
    _REGISTRY[cls.name] = cls
    return cls


_CANONICAL_ORDER = [
    "hessian_free",
    "diagonal_fisher",
    "datainf",
    "lissa",
    "rrinf",
    "rrinf_fixed_point",
    "exact",
    "kfac",
    "ekfac",
    "z0inf",
    "bif",
]


@dataclass(frozen=True)
class MethodInfo:
    """What the registry knows about one method (the class's own facts; see :func:`method_info`)."""

    name: str  # canonical name, as in influence(method=...) and the CLI
    cls: type  # the estimator class
    input_kind: str  # "gradients" (GradientSet) or "traces" (LossTrace)
    uses_damping: bool  # whether the scores depend on the damping λ (the `damping` option)
    stochastic: bool  # whether the scores depend on the `seed` option (report seed variance)
    options: tuple[str, ...]  # names of the constructor options (the Options dataclass fields)


def _key(method: str) -> str:
    if not isinstance(method, str):
        raise TypeError(f"method must be a str, got {type(method).__name__}")
    return method.strip().lower().replace("-", "_")


def available_methods(input_kind: str | None = None) -> list[str]:
    """Canonical names of the implemented methods (usable in :func:`influence` and the CLI), in the
    canonical order. ``input_kind="gradients"`` or ``"traces"`` keeps only the methods of that input."""
    if input_kind is not None and input_kind not in INPUT_KINDS:
        raise ValueError(f"input_kind must be None, 'gradients' or 'traces', got {input_kind!r}")
    order = {k: i for i, k in enumerate(_CANONICAL_ORDER)}
    names = sorted(_REGISTRY, key=lambda k: (order.get(k, len(order)), k))
    return [k for k in names if input_kind is None or _REGISTRY[k].input_kind == input_kind]


def method_info(name: str) -> MethodInfo:
    """The registry's facts about a method (``"datainf"``, ``"rrinf"``, ``"z0inf"``, ...)."""
    key = _key(name)
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {available_methods()}")
    return _REGISTRY[key].info()


def get_estimator(method: str, **options: Any) -> BaseEstimator:
    """An estimator instance by canonical name (``"datainf"``, ``"exact"``, ...)."""
    key = _key(method)
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {method!r}; available: {available_methods()}")
    return _REGISTRY[key](**options)


def influence(
    train: GradientSet, test: GradientSet, method: str = "datainf", reduce: str | None = None, **options: Any
) -> torch.Tensor:
    """One-call influence: ``get_estimator(method, **options).fit(train).score(test, reduce=reduce)``.

    Returns (m, n) scores, or (n,) with ``reduce="mean"``; positive = harmful (METHODS.md §0).
    """
    return get_estimator(method, **options).fit(train).score(test, reduce=reduce)
