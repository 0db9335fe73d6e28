"""Backend choice for the numeric ops: CUDA extension > Triton > PyTorch.

``backend="auto"`` takes the best available backend for the op and the tensors' device, and logs the
choice once per op. An explicitly requested backend that cannot run raises ``RuntimeError`` naming
the backend, the device and the reason; it never falls back silently. ``FASTINF_BACKEND`` overrides
``"auto"``.

This release ships the PyTorch references only; the Triton and CUDA kernels register themselves in
``_KERNELS`` when they land (kernels issue), without changing any caller.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

log = logging.getLogger("fastinf.ops")

BACKENDS = ("cuda", "triton", "torch")
_KERNELS: dict[tuple[str, str], Callable] = {}  # (op, backend) -> implementation
_LOGGED: set[str] = set()


def register(op: str, backend: str, fn: Callable) -> None:
    """Register an implementation of ``op`` for ``backend`` (used by kernel modules)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _KERNELS[(op, backend)] = fn


def _why_unavailable(backend: str, device: torch.device | None = None) -> str | None:
    """None if ``backend`` can run on ``device``; otherwise the reason it cannot."""
    if backend == "torch":
        return None
    if device is not None and device.type != "cuda":
        return f"tensors are on {device.type}; the {backend} backend needs a CUDA device"
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except Exception as e:  # pragma: no cover - depends on the machine
            return f"triton is not importable ({e})"
    return None


def backends() -> dict[str, str]:
    """State of each backend on this machine: ``"available"`` or the reason it is not."""
    out = {}
    for b in BACKENDS:
        why = _why_unavailable(b)
        if why is None and b != "torch" and not any(k[1] == b for k in _KERNELS):
            why = "no kernels of this backend are registered in this build"
        out[b] = "available" if why is None else f"unavailable: {why}"
    return out


def resolve(op: str, backend: str, device: torch.device) -> str:
    """Name of the backend that will run ``op`` on ``device`` for the requested ``backend``."""
    requested = backend
    if backend == "auto":
        backend = os.environ.get("FASTINF_BACKEND", "auto").strip().lower() or "auto"
    if backend == "auto":
        for b in BACKENDS:
            if b == "torch" or ((op, b) in _KERNELS and _why_unavailable(b, device) is None):
                if op not in _LOGGED:
                    log.info("fastinf.ops.%s: using the %s backend on %s", op, b, device)
                    _LOGGED.add(op)
                return b
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {requested!r}")
    if backend != "torch":
        why = _why_unavailable(backend, device)
        if why is None and (op, backend) not in _KERNELS:
            why = f"no {backend} kernel for {op} in this build"
        if why is not None:
            raise RuntimeError(f"fastinf.ops.{op}: backend {backend!r} cannot run on {device}: {why}")
    return backend


def implementation(op: str, backend: str) -> Callable | None:
    return _KERNELS.get((op, backend))
