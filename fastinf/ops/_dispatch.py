"""Backend choice for the numeric ops: CUDA extension > Triton > PyTorch.

``backend="auto"`` takes the best backend that can run the op on the given tensors and logs the choice
once per (op, backend, device type). An explicitly requested backend that cannot run raises
``RuntimeError`` naming the op, the backend, the device and the reason; it never falls back silently.
The environment variable ``FASTINF_BACKEND`` (``auto``/``cuda``/``triton``/``torch``) overrides
``backend="auto"`` and then counts as an explicit request.

Kernels register lazily: nothing here imports triton, builds the CUDA extension or initialises CUDA
until an op is dispatched on a CUDA tensor. Then the Triton kernels (``fastinf.kernels``) and the CUDA
extension (``fastinf._ext``, JIT-built with ninja on first use and cached) are loaded once; a load or
build failure is remembered and reported as the backend's reason.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import threading
from collections.abc import Callable

import torch

log = logging.getLogger("fastinf.ops")

BACKENDS = ("cuda", "triton", "torch")
_KERNELS: dict[tuple[str, str], Callable] = {}  # (op, backend) -> implementation
_SUPPORTS: dict[tuple[str, str], Callable[..., str | None]] = {}  # (op, backend) -> reason-or-None check
_LOGGED: set[tuple[str, str, str]] = set()
_LOAD_ERRORS: dict[str, str] = {}  # backend -> why its kernels could not be loaded
_LOADED: set[str] = set()
_LOCK = threading.RLock()


def register(op: str, backend: str, fn: Callable, supports: Callable[..., str | None] | None = None) -> None:
    """Register an implementation of ``op`` for ``backend`` (used by kernel modules).

    ``fn`` has the reference's signature. ``supports(*args, **kwargs)`` (optional) returns ``None`` if
    ``fn`` can run these inputs, else the reason (e.g. an unsupported dtype); ``auto`` then moves on.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _KERNELS[(op, backend)] = fn
    if supports is not None:
        _SUPPORTS[(op, backend)] = supports


def _cuda_capability_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"the kernels need compute capability >= 8.0 (bf16/tf32 tensor cores), this GPU has {major}.{minor}"
    return None


def _why_unavailable(backend: str, device: torch.device | None = None) -> str | None:
    """None if ``backend`` can run on ``device`` as far as can be told without loading it; else why not."""
    if backend == "torch":
        return None
    if device is not None and device.type != "cuda":
        return f"tensors are on {device.type}; the {backend} backend needs a CUDA device"
    why = _cuda_capability_reason()
    if why is not None:
        return why
    if backend in _LOAD_ERRORS:
        return _LOAD_ERRORS[backend]
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
    elif backend == "cuda":
        from .._ext import build

        return build.why_unavailable()
    return None


def _ensure_loaded(backend: str) -> str | None:
    """Import / build ``backend``'s kernels once (they register themselves). None on success, else why not."""
    if backend == "torch" or backend in _LOADED:
        return None
    with _LOCK:
        if backend in _LOADED:
            return None
        if backend in _LOAD_ERRORS:
            return _LOAD_ERRORS[backend]
        try:
            if backend == "triton":
                importlib.import_module("fastinf.kernels").register_all()
            else:
                importlib.import_module("fastinf._ext.ops").register_all()
        except Exception as e:  # noqa: BLE001 - any load/build failure becomes the backend's reason
            _LOAD_ERRORS[backend] = f"loading the {backend} kernels failed: {type(e).__name__}: {e}"
            log.warning("fastinf.ops: the %s backend is unavailable: %s", backend, _LOAD_ERRORS[backend])
            return _LOAD_ERRORS[backend]
        _LOADED.add(backend)
    return None


def backends() -> dict[str, str]:
    """State of each backend on this machine: ``"available"`` or ``"unavailable: <reason>"``.

    Cheap: nothing is built or compiled (a CUDA extension that has not been built yet counts as available
    when the toolchain to build it is present; a failed build is reported once it has been tried).
    """
    out = {}
    for b in BACKENDS:
        why = _why_unavailable(b)
        out[b] = "available" if why is None else f"unavailable: {why}"
    return out


def _requested(backend: str) -> str:
    if backend == "auto":
        backend = os.environ.get("FASTINF_BACKEND", "auto").strip().lower() or "auto"
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"FASTINF_BACKEND must be 'auto' or one of {BACKENDS}, got {backend!r}")
    elif backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    return backend


def _reason(op: str, backend: str, device: torch.device, args: tuple, kwargs: dict) -> str | None:
    why = _why_unavailable(backend, device) or _ensure_loaded(backend)
    if why is None and (op, backend) not in _KERNELS:
        why = f"no {backend} kernel for {op} in this build"
    if why is None and args and (op, backend) in _SUPPORTS:
        why = _SUPPORTS[(op, backend)](*args, **kwargs)
    return why


def select(op: str, backend: str, device: torch.device, args: tuple = (), kwargs: dict | None = None):
    """``(backend name, implementation or None for the PyTorch reference)`` for ``op`` on these inputs."""
    kwargs = kwargs or {}
    requested = _requested(backend)
    if requested == "torch":
        return "torch", None
    if requested == "auto":
        skipped = []
        if device.type == "cuda":
            for b in ("cuda", "triton"):
                why = _reason(op, b, device, args, kwargs)
                if why is None:
                    _log_choice(op, b, device, skipped)
                    return b, _KERNELS[(op, b)]
                skipped.append(f"{b}: {why}")
        _log_choice(op, "torch", device, skipped)
        return "torch", None
    why = _reason(op, requested, device, args, kwargs)
    if why is not None:
        raise RuntimeError(f"fastinf.ops.{op}: backend {requested!r} cannot run on {device}: {why}")
    return requested, _KERNELS[(op, requested)]


def _log_choice(op: str, backend: str, device: torch.device, skipped: list[str]) -> None:
    key = (op, backend, device.type)
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    extra = f" (skipped {'; '.join(skipped)})" if skipped else ""
    log.info("fastinf.ops.%s: using the %s backend on %s%s", op, backend, device, extra)


def resolve(op: str, backend: str, device: torch.device) -> str:
    """Name of the backend that will run ``op`` on ``device`` for the requested ``backend``."""
    return select(op, backend, device)[0]


def implementation(op: str, backend: str) -> Callable | None:
    return _KERNELS.get((op, backend))
