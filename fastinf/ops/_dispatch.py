"""Backend choice for the numeric ops, read from one static table: :data:`DISPATCH_TABLE`.

For every op the table lists its backends in the order ``backend="auto"`` tries them; each row names the
module and function that implement the op and the check that decides whether that function takes the given
inputs. ``auto`` takes the first backend that can run the op on the given tensors and logs the choice once per
(op, backend, device type). An explicitly requested backend that cannot run raises ``RuntimeError`` naming the
op, the backend, the device and the reason; it never falls back silently. The environment variable
``FASTINF_BACKEND`` (``auto``/``cuda``/``triton``/``torch``) overrides ``backend="auto"`` and then counts as an
explicit request.

The backends never import ``fastinf.ops``: the table refers to them by module path, and nothing here imports
triton, builds the CUDA extension or initialises CUDA until an op is dispatched on a CUDA tensor. Then the
backend's modules named in the table are imported once (for ``cuda`` after :data:`BACKEND_SETUP` has loaded or
JIT-built the extension, cached); a load or build failure is remembered and reported as the backend's reason.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger("fastinf.ops")

BACKENDS = ("cuda", "triton", "torch")


@dataclass(frozen=True)
class Backend:
    """One row of :data:`DISPATCH_TABLE`: ``module.function`` implements the op on backend ``name``.

    ``supports`` (``"module:function"``, optional) has the op's signature and returns ``None`` if the
    implementation takes these inputs, else the reason (e.g. an unsupported dtype); ``auto`` then moves on.
    """

    name: str  # "cuda" | "triton" | "torch"
    module: str
    function: str
    supports: str | None = None


_EXT = "fastinf._ext.ops"
_K = "fastinf.kernels"
_COMMON = "fastinf.kernels._common"  # the checks the CUDA and Triton kernels share

# op -> its backends in the order ``auto`` tries them; the ``torch`` row is the op's PyTorch reference and
# always runs. No backend has been measured on a GPU yet (bench/results holds CPU timings of the reference
# only), so every op keeps the order it had before this table existed: CUDA extension > Triton > PyTorch.
# A later issue replaces it with the order the GPU measurements support (per shape class where they differ).
# A backend without a row for an op has no kernel for it: ``backend=<it>`` raises, ``auto`` does not try it.
DISPATCH_TABLE: dict[str, tuple[Backend, ...]] = {
    "lora_per_sample_grads": (
        Backend("cuda", _EXT, "lora_per_sample_grads_cuda", f"{_COMMON}:supports_lora"),
        Backend("triton", f"{_K}.lora_per_sample_grads", "lora_per_sample_grads_triton", f"{_COMMON}:supports_lora"),
        Backend("torch", "fastinf.ops.lora_per_sample_grads", "lora_per_sample_grads_reference"),
    ),
    "datainf_inverse_sum": (
        Backend("cuda", _EXT, "datainf_inverse_sum_cuda", f"{_COMMON}:supports_datainf"),
        Backend("triton", f"{_K}.datainf_inverse_sum", "datainf_inverse_sum_triton", f"{_COMMON}:supports_datainf"),
        Backend("torch", "fastinf.ops.datainf_inverse_sum", "datainf_inverse_sum_reference"),
    ),
    "rrinf_row_updates": (
        Backend("cuda", _EXT, "rrinf_row_updates_cuda", f"{_COMMON}:supports_rrinf"),
        # the Triton check adds the kernel's size limit (Ω kept in registers)
        Backend("triton", f"{_K}.rrinf_row_updates", "rrinf_row_updates_triton", f"{_K}.rrinf_row_updates:supports"),
        Backend("torch", "fastinf.ops.rrinf_row_updates", "rrinf_row_updates_reference"),
    ),
    "trace_cov": (
        Backend("triton", f"{_K}.trace_cov", "trace_cov_triton", f"{_K}.trace_cov:supports_trace_cov"),
        Backend("torch", "fastinf.ops.trace_cov", "trace_cov_reference"),
    ),
    "trace_cov_topk": (
        Backend("triton", f"{_K}.trace_cov", "trace_cov_topk_triton", f"{_K}.trace_cov:supports_trace_cov_topk"),
        Backend("torch", "fastinf.ops.trace_cov", "trace_cov_topk_reference"),
    ),
}

# backend -> "module:function" called once before the backend's first op (loads or JIT-builds the extension)
BACKEND_SETUP: dict[str, str] = {"cuda": "fastinf._ext.build:load"}

_IMPLS: dict[tuple[str, str], tuple[Callable, Callable[..., str | None] | None]] = {}  # (op, backend) -> (fn, check)
_LOGGED: set[tuple[str, str, str]] = set()
_LOAD_ERRORS: dict[str, str] = {}  # backend -> why its kernels could not be loaded
_LOADED: set[str] = set()
_LOCK = threading.RLock()


def _attr(path: str):
    """The object ``"module:name"`` names (the module is imported)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _row(op: str, backend: str) -> Backend | None:
    return next((r for r in DISPATCH_TABLE.get(op, ()) if r.name == backend), None)


def _load_row(op: str, row: Backend) -> tuple[Callable, Callable[..., str | None] | None]:
    key = (op, row.name)
    if key not in _IMPLS:
        fn = getattr(importlib.import_module(row.module), row.function)
        _IMPLS[key] = (fn, _attr(row.supports) if row.supports else None)
    return _IMPLS[key]


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
    """Set up ``backend`` and import every implementation the table names for it, once. None on success,
    else why not (remembered)."""
    if backend == "torch" or backend in _LOADED:
        return None
    with _LOCK:
        if backend in _LOADED:
            return None
        if backend in _LOAD_ERRORS:
            return _LOAD_ERRORS[backend]
        try:
            if backend in BACKEND_SETUP:
                _attr(BACKEND_SETUP[backend])()
            for op, rows in DISPATCH_TABLE.items():
                for row in rows:
                    if row.name == backend:
                        _load_row(op, row)
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
    """None if ``backend`` runs ``op`` on these inputs (its implementation is then loaded), else why not."""
    why = _why_unavailable(backend, device)
    if why is None and _row(op, backend) is None:
        why = f"no {backend} kernel for {op} in this build"
    if why is None:
        why = _ensure_loaded(backend)
    if why is None and args:
        check = _load_row(op, _row(op, backend))[1]
        if check is not None:
            why = check(*args, **kwargs)
    return why


def select(op: str, backend: str, device: torch.device, args: tuple = (), kwargs: dict | None = None):
    """``(backend name, implementation)`` for ``op`` on these inputs; the ``torch`` implementation is the op's
    PyTorch reference."""
    kwargs = kwargs or {}
    requested = _requested(backend)
    if requested == "auto":
        skipped = []
        for row in DISPATCH_TABLE[op]:
            if row.name != "torch":
                if device.type != "cuda":  # the kernels need a CUDA device: nothing to try or report
                    continue
                why = _reason(op, row.name, device, args, kwargs)
                if why is not None:
                    skipped.append(f"{row.name}: {why}")
                    continue
            _log_choice(op, row.name, device, skipped)
            return row.name, _load_row(op, row)[0]
        raise RuntimeError(f"fastinf.ops.{op}: no backend can run on {device}: {'; '.join(skipped)}")
    why = _reason(op, requested, device, args, kwargs)
    if why is not None:
        raise RuntimeError(f"fastinf.ops.{op}: backend {requested!r} cannot run on {device}: {why}")
    return requested, _load_row(op, _row(op, requested))[0]


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
    """The function the table names for ``op`` on ``backend`` (its module imported; nothing built, no device
    check), or None where the table has no such row."""
    row = _row(op, backend)
    return None if row is None else _load_row(op, row)[0]
