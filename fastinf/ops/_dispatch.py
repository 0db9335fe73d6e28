"""Backend choice for the numeric ops, read from one static table: :data:`DISPATCH_TABLE`.

For every op the table lists its implementations (:class:`Backend`: the module and function of each backend and
the check that decides whether that function takes the given inputs) and its ``auto`` routes (:class:`Route`:
per shape class, the backends ``backend="auto"`` tries on a CUDA device, in order, and the measurement that
order comes from). A route may put a kernel before the PyTorch reference only with a citation of the GPU
measurement behind it; an unmeasured shape class runs the reference on the GPU too. On a CPU ``auto`` runs the
reference. ``auto`` takes the first backend of the route that can run the op on the given tensors (the
reference when none can) and logs the choice once per (op, backend, device type). An explicitly requested
backend that cannot run raises ``RuntimeError`` naming the op, the backend, the device and the reason; it never
falls back silently. The environment variable
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
    """One implementation of an op: ``module.function`` on backend ``name``.

    ``supports`` (``"module:function"``, optional) has the op's signature and returns ``None`` if the
    implementation takes these inputs, else the reason (e.g. an unsupported dtype); ``auto`` then moves on.
    """

    name: str  # "cuda" | "triton" | "torch"
    module: str
    function: str
    supports: str | None = None


@dataclass(frozen=True)
class Route:
    """One shape class of an op under ``backend="auto"`` on a CUDA device.

    ``when`` (``"module:function"``, optional) has the op's signature and returns True for inputs of this class;
    the op's last route has ``when=None`` and takes the rest. ``order``: the backends tried, first that can run
    wins (the reference ends every order). ``measured``: where the order comes from (a results file and its
    rows); None means not measured on a GPU, and then ``order`` is the reference alone.
    """

    shapes: str  # the class in words, e.g. "m <= 8"
    order: tuple[str, ...]
    measured: str | None = None
    when: str | None = None
    why: str = ""  # what else the choice rests on (e.g. a traffic model), for the reader


@dataclass(frozen=True)
class OpEntry:
    """An op's row of :data:`DISPATCH_TABLE`: its implementations and its ``auto`` routes."""

    backends: tuple[Backend, ...]
    routes: tuple[Route, ...]


_EXT = "fastinf._ext.ops"
_K = "fastinf.kernels"
_COMMON = "fastinf.kernels._common"  # the checks the CUDA and Triton kernels share
_REF = ("torch",)
_UNMEASURED = "no kernel has run on a GPU yet (bench/gpu_check.sh pending): the PyTorch reference until measured"

# op -> implementations and auto routes. The kernels are never picked by ``auto`` before a GPU measurement:
# bench/gpu_check.sh writes bench/results/gpu/bench_ops.csv (each kernel against the bf16 unfused baseline and the
# roofline, per shape); a route then lists the backends in the order those rows support, citing them, e.g.
#   Route("N*S >= 4096", ("triton", "cuda", "torch"), measured="bench/results/gpu/bench_ops.csv: lora N=16 ...")
# A backend without an implementation for an op has no kernel for it: ``backend=<it>`` raises, ``auto`` skips it.
DISPATCH_TABLE: dict[str, OpEntry] = {
    "lora_per_sample_grads": OpEntry(
        (
            Backend("cuda", _EXT, "lora_per_sample_grads_cuda", f"{_COMMON}:supports_lora"),
            Backend(
                "triton", f"{_K}.lora_per_sample_grads", "lora_per_sample_grads_triton", f"{_COMMON}:supports_lora"
            ),
            Backend("torch", "fastinf.ops.lora_per_sample_grads", "lora_per_sample_grads_reference"),
        ),
        (Route("all shapes", _REF, why=_UNMEASURED),),
    ),
    "datainf_inverse_sum": OpEntry(
        (
            Backend("cuda", _EXT, "datainf_inverse_sum_cuda", f"{_COMMON}:supports_datainf"),
            Backend("triton", f"{_K}.datainf_inverse_sum", "datainf_inverse_sum_triton", f"{_COMMON}:supports_datainf"),
            Backend("torch", "fastinf.ops.datainf_inverse_sum", "datainf_inverse_sum_reference"),
        ),
        (
            # the small-m class (GEMV-shaped, bandwidth-bound): the CUDA kernel pads m to 64-row tiles (96x the
            # useful flops at m = 1), the Triton kernel to 16-row tiles (24x; both 2.0x the minimum bytes against
            # the reference's 9.0x: bench/bench_ops.py traffic model), so this class gets its own measured order
            Route("m <= 8", _REF, when="fastinf.ops.datainf_inverse_sum:small_m", why="GEMV-shaped: " + _UNMEASURED),
            Route("m > 8", _REF, why=_UNMEASURED),
        ),
    ),
    "rrinf_row_updates": OpEntry(
        (
            Backend("cuda", _EXT, "rrinf_row_updates_cuda", f"{_COMMON}:supports_rrinf"),
            # the Triton check adds the kernel's size limit (Ω kept in registers)
            Backend(
                "triton", f"{_K}.rrinf_row_updates", "rrinf_row_updates_triton", f"{_K}.rrinf_row_updates:supports"
            ),
            Backend("torch", "fastinf.ops.rrinf_row_updates", "rrinf_row_updates_reference"),
        ),
        (Route("all shapes", _REF, why=_UNMEASURED),),
    ),
    "trace_cov": OpEntry(
        (
            Backend("triton", f"{_K}.trace_cov", "trace_cov_triton", f"{_K}.trace_cov:supports_trace_cov"),
            Backend("torch", "fastinf.ops.trace_cov", "trace_cov_reference"),
        ),
        (Route("all shapes", _REF, why=_UNMEASURED),),
    ),
    "trace_cov_topk": OpEntry(
        (
            Backend("triton", f"{_K}.trace_cov", "trace_cov_topk_triton", f"{_K}.trace_cov:supports_trace_cov_topk"),
            Backend("torch", "fastinf.ops.trace_cov", "trace_cov_topk_reference"),
        ),
        (Route("all shapes", _REF, why=_UNMEASURED),),
    ),
}


def check_table(table: dict[str, OpEntry] | None = None) -> None:
    """The table's rules (tests/ops check them): one implementation per backend, a ``torch`` one; routes that
    end with the catch-all (``when=None``) and with the reference, name only implemented backends, and put a
    kernel in the order only with a measurement cited. Raises ValueError naming the op and the rule."""
    for op, entry in (DISPATCH_TABLE if table is None else table).items():
        names = [b.name for b in entry.backends]
        if len(names) != len(set(names)) or "torch" not in names or not set(names) <= set(BACKENDS):
            raise ValueError(f"DISPATCH_TABLE[{op!r}]: backends {names} (one each of {BACKENDS}, torch included)")
        if not entry.routes or entry.routes[-1].when is not None:
            raise ValueError(f"DISPATCH_TABLE[{op!r}]: the last route must take every input (when=None)")
        for r in entry.routes:
            if not r.order or r.order[-1] != "torch" or not set(r.order) <= set(names):
                raise ValueError(f"DISPATCH_TABLE[{op!r}] route {r.shapes!r}: order {r.order} must end with torch")
            if r.order != _REF and not r.measured:
                raise ValueError(
                    f"DISPATCH_TABLE[{op!r}] route {r.shapes!r}: a kernel in the auto order needs the GPU "
                    "measurement it comes from (measured=...)"
                )


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
    entry = DISPATCH_TABLE.get(op)
    return None if entry is None else next((r for r in entry.backends if r.name == backend), None)


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
            for op, entry in DISPATCH_TABLE.items():
                for row in entry.backends:
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


def route(op: str, args: tuple = (), kwargs: dict | None = None) -> Route:
    """The ``auto`` route of ``op`` for these inputs: the first whose ``when`` accepts them (the last without
    inputs)."""
    routes = DISPATCH_TABLE[op].routes
    if args:
        for r in routes:
            if r.when is None or _attr(r.when)(*args, **(kwargs or {})):
                return r
    return routes[-1]


def select(op: str, backend: str, device: torch.device, args: tuple = (), kwargs: dict | None = None):
    """``(backend name, implementation)`` for ``op`` on these inputs; the ``torch`` implementation is the op's
    PyTorch reference."""
    kwargs = kwargs or {}
    requested = _requested(backend)
    if requested == "auto":
        skipped = []
        order = route(op, args, kwargs).order if device.type == "cuda" else _REF  # the kernels need a CUDA device
        for name in order:
            if name != "torch":
                why = _reason(op, name, device, args, kwargs)
                if why is not None:
                    skipped.append(f"{name}: {why}")
                    continue
            _log_choice(op, name, device, skipped)
            return name, _load_row(op, _row(op, name))[0]
        _log_choice(op, "torch", device, skipped)  # (an order always ends with torch; kept for a hand-made table)
        return "torch", _load_row(op, _row(op, "torch"))[0]
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


check_table()
