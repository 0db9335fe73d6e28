"""Options shared by the gradient-based estimators (:class:`EstimatorOptions`, a validated dataclass
that every method's own options extend)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


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

    ``damping`` follows one rule for every gradient method: ``"auto"`` or a positive finite float
    (λ = 0 would divide by zero in every method that uses it). Methods that do not use damping
    (``hessian_free``; see ``method_info(name).uses_damping``) validate it by the same rule and then
    ignore it, so that one set of options can be passed to every method.

    Raises:
        ValueError: an invalid option, naming it (the estimator's constructor prefixes its class
            name: "DataInf: damping must be 'auto' or a positive finite float, got 0").
    """

    damping: float | str = field(
        default="auto",
        metadata={
            "help": "'auto' = damping_factor × mean squared gradient entry (METHODS.md §0), or an absolute λ > 0; "
            "validated but ignored by methods that do not use damping (hessian_free)"
        },
    )
    damping_factor: float = field(default=0.1, metadata={"help": "coefficient of the 'auto' rule (0.1 in both papers)"})
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
        if self.damping != "auto":
            d = self.damping
            ok = not isinstance(d, (bool, str)) and isinstance(d, (int, float)) and math.isfinite(d) and d > 0
            if not ok:
                raise ValueError(f"damping must be 'auto' or a positive finite float, got {d!r}")
            self.damping = float(d)
        if not (isinstance(self.damping_factor, (int, float)) and self.damping_factor > 0):
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
