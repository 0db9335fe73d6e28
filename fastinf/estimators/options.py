"""Options shared by the gradient-based estimators (:class:`EstimatorOptions`, a validated dataclass
that every method's own options extend)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .damping import ESTIMATOR_RULES, PAPER_C, check_rule

_BAD_DAMPING = "damping must be 'auto' or a positive finite float, got {!r}"
_GCV_AT_FIT = (
    "damping='gcv' needs the test gradients, which fit does not see: choose λ with "
    "fastinf.select_damping(train, test, rule='gcv') (blockwise=True for a dict) and pass it as damping="
)


def _positive(x: Any) -> bool:
    return not isinstance(x, (bool, str)) and isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_damping(d: Any) -> float | str | tuple[str, dict[str, float]] | dict[str, float]:
    """The ``damping`` option validated and normalised: ``"auto"``; a rule name (``"paper"``,
    ``"mean_eig"``, ``"dof"``) or a ``(rule, options)`` pair such as
    :data:`~fastinf.estimators.damping.LABEL_FREE_RULE`, resolved at fit from the training gradients; a
    positive finite float; or a dict block → positive finite λ (per-block preconditioners only; its block
    names are checked at fit).

    ``"gcv"`` is refused: it needs the test gradients, which ``fit`` does not see — the message says to call
    :func:`fastinf.select_damping` and pass the λ it returns.

    Raises:
        ValueError: one line naming the problem.
    """
    if isinstance(d, str):
        if d == "auto" or d in ESTIMATOR_RULES:
            return d
        if d == "gcv":
            raise ValueError(_GCV_AT_FIT)
        rules = ", ".join(repr(r) for r in ESTIMATOR_RULES)
        raise ValueError(_BAD_DAMPING.format(d) + f" (or a rule: {rules}; a (rule, options) pair; a dict block→λ)")
    if isinstance(d, tuple) and len(d) == 2 and isinstance(d[0], str) and (d[1] is None or isinstance(d[1], Mapping)):
        if d[0] == "gcv":
            raise ValueError(_GCV_AT_FIT)
        try:
            check_rule(d[0], d[1])
        except ValueError as e:
            raise ValueError(f"damping: {e}") from None
        # the options as given: the rule's defaults are filled in at resolution (damping_rule), so that
        # ("paper", {}) takes damping_factor as its c like damping="paper"
        return (d[0], dict(d[1] or {}))
    if isinstance(d, Mapping):
        if not d:
            raise ValueError("damping: an empty dict names no block")
        out = {}
        for k, v in d.items():
            if not isinstance(k, str):
                raise ValueError(f"damping: a dict's keys must be block names (str), got {k!r}")
            if not _positive(v):
                raise ValueError(f"damping[{k!r}] must be a positive finite float, got {v!r}")
            out[k] = float(v)
        return out
    if not _positive(d):
        raise ValueError(_BAD_DAMPING.format(d))
    return float(d)


def _as_dtype(x: Any, fieldname: str) -> torch.dtype | None:
    if x is None:
        return None
    if isinstance(x, str):
        x = getattr(torch, x.replace("torch.", ""), None)
    if not isinstance(x, torch.dtype) or not x.is_floating_point:
        raise ValueError(f"{fieldname} must be a floating torch dtype (e.g. torch.float64 or 'float32'), got {x!r}")
    return x


@dataclass
class EstimatorOptions:
    """Options shared by the gradient-based estimators.

    ``damping`` follows one rule for every gradient method (see :func:`check_damping`): ``"auto"`` (the
    method's default rule, ``default_damping`` on its class: the papers' rule unless stated), a rule
    resolved at fit (``"paper"``, ``"mean_eig"``, ``"dof"``, or ``(rule, options)`` such as
    ``LABEL_FREE_RULE``), a positive finite float (λ = 0 would divide by zero in every method that uses
    it), or a dict block → λ for per-block preconditioners. ``damping_factor`` is the coefficient of the
    papers' rule; giving it explicitly with ``damping="auto"`` selects the papers' rule, so that code written
    for the papers' λ (the compat engines, damping sweeps) keeps it exactly. Methods that do not use damping
    (``hessian_free``; see ``method_info(name).uses_damping``) validate it by the same rule and then
    ignore it, so that one set of options can be passed to every method.

    Raises:
        ValueError: an invalid option, naming it (the estimator's constructor prefixes its class
            name: "DataInf: damping must be 'auto' or a positive finite float, got 0").
    """

    damping: float | str = field(
        default="auto",
        metadata={
            "help": "'auto' (the method's default rule), a rule 'paper' | 'mean_eig' | 'dof' or (rule, options) "
            "resolved at fit (METHODS.md §0, §10), an absolute λ > 0, or a dict block→λ (blockwise); "
            "validated but ignored by methods that do not use damping (hessian_free)"
        },
    )
    damping_factor: float | None = field(
        default=None,
        metadata={
            "help": "coefficient c of the papers' rule λ = c × mean squared entry (default 0.1, as in both papers); "
            "given explicitly, damping='auto' means the papers' rule; ignored by the other rules"
        },
    )
    blockwise: bool = field(default=False, metadata={"help": "per-block (True) or global (False) preconditioner"})
    dtype: Any = field(default=None, metadata={"help": "compute dtype; default: input dtype promoted to float32"})
    device: Any = field(default=None, metadata={"help": "compute device; default: the training gradients' device"})
    backend: str = field(default="auto", metadata={"help": "'auto' | 'cuda' | 'triton' | 'torch' for fastinf.ops"})
    chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "training examples per row chunk in every pass over the training gradients "
            "(None: automatic, from memory_budget)"
        },
    )
    memory_budget: int = field(
        default=1 << 30,
        metadata={
            "help": "bytes: the automatic chunk size uses a quarter of it; the limits of whole-set buffers "
            "(exact's n×n Gram on a store, rrinf's gathered coordinates) refuse beyond it"
        },
    )
    distributed: bool | str = field(
        default="auto",
        metadata={
            "help": "split the training rows over the ranks of the torch.distributed process group: 'auto' "
            "(when one is initialised), True or False"
        },
    )
    allow_mismatch: bool = field(
        default=False,
        metadata={
            "help": "score/topk a test GradientStore whose manifest records another model or adapter than the "
            "training store's (default: refuse with a StoreError; see fastinf.gradients.store.check_same_model)"
        },
    )

    def __post_init__(self) -> None:
        self.damping = check_damping(self.damping)
        # None = not given: kept as None (not replaced by 0.1) so that equality, repr and dataclasses.replace
        # carry whether it was given, which decides what damping="auto" means (damping_rule)
        if self.damping_factor is not None and not _positive(self.damping_factor):
            raise ValueError(f"damping_factor must be > 0, got {self.damping_factor!r}")
        self.dtype = _as_dtype(self.dtype, "dtype")
        if self.device is not None:
            self.device = torch.device(self.device)
        if self.backend not in ("auto", "cuda", "triton", "torch"):
            raise ValueError(f"backend must be 'auto', 'cuda', 'triton' or 'torch', got {self.backend!r}")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {self.chunk_size!r}")
        if not isinstance(self.allow_mismatch, bool):
            raise ValueError(f"allow_mismatch must be a bool, got {self.allow_mismatch!r}")
        mb = self.memory_budget
        if isinstance(mb, bool) or not isinstance(mb, int) or mb < 1:
            raise ValueError(f"memory_budget must be a positive int (bytes), got {mb!r}")
        if not (self.distributed == "auto" or isinstance(self.distributed, bool)):
            raise ValueError(f"distributed must be 'auto', True or False, got {self.distributed!r}")

    def damping_rule(self, default: tuple[str, Mapping[str, float]]) -> tuple[str, dict[str, float]] | None:
        """The rule ``damping`` resolves to at fit, ``(rule, options)`` with its constants, or None for an
        explicit λ (float or dict). ``"auto"`` is ``default`` (the method's), except that an explicitly given
        ``damping_factor`` selects the papers' rule; the papers' rule takes ``damping_factor`` as its c unless
        a ``("paper", {"c": ...})`` pair says otherwise."""
        d = self.damping
        if not isinstance(d, (str, tuple)):
            return None
        if d == "auto":
            rule, opts = ("paper", {}) if self.damping_factor is not None else default
        elif isinstance(d, str):
            rule, opts = d, {}
        else:
            rule, opts = d
        if rule == "paper" and "c" not in opts:
            opts = {**opts, "c": self.factor}
        return check_rule(rule, opts)

    @property
    def factor(self) -> float:
        """The papers' coefficient c: ``damping_factor``, or 0.1 (both papers) when it was not given."""
        return PAPER_C if self.damping_factor is None else float(self.damping_factor)
