"""One implementation of the small utilities every layer needs.

* atomic writes: :func:`atomic_write` (write a temporary file, optionally fsync, rename), :func:`write_json`;
* timing and peak memory: :class:`PeakMemory`, :func:`timed`, :func:`time_fn` (repeated timings with
  percentiles; CUDA events on a GPU);
* tables and numbers: :func:`fmt`, :func:`pm`, :func:`markdown_table`, :func:`text_table`;
* where a result came from: :func:`version_string`, :func:`device_string`, :func:`git_commit`, :func:`loadavg`.

A leaf module: it imports only the standard library at import time (torch and numpy lazily), so every
layer of the package, ``bench/`` and ``tests/`` may use it.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .version import __version__

__all__ = [
    "PeakMemory",
    "TimingStats",
    "atomic_write",
    "device_string",
    "fmt",
    "git_commit",
    "loadavg",
    "markdown_table",
    "pm",
    "text_table",
    "time_fn",
    "timed",
    "to_jsonable",
    "version_string",
    "write_json",
]


# ------------------------------------------------------------------------------------ atomic writes
def atomic_write(path: str | os.PathLike, data: bytes | str, *, durable: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically: a reader sees the old file or the new one, never a part.

    The data goes to a temporary file next to ``path`` (``.<name>.tmp-<pid>``) that is then renamed
    over it. ``durable=True`` also fsyncs the file and its directory, so the write survives a power
    loss (the gradient store's shards and manifest). Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if durable:
        try:  # make the rename itself durable
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:  # pragma: no cover - platform dependent
            pass
    return path


def to_jsonable(x: Any) -> Any:
    """``x`` with tensors/arrays as lists, paths as strings, non-finite floats as ``None``."""
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [to_jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return to_jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def write_json(path: str | os.PathLike, payload: Any, *, indent: int = 1) -> Path:
    """Write ``payload`` (via :func:`to_jsonable`) as JSON, atomically."""
    return atomic_write(path, json.dumps(to_jsonable(payload), indent=indent) + "\n")


# ------------------------------------------------------------------------------------ peak memory
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_hwm() -> bool:
    """Reset the process's peak-RSS counter (Linux ``clear_refs``); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kb("VmHWM")
        return True
    except (OSError, KeyError):
        return False


def _release_free_memory() -> None:
    """Hand the C allocator's free pages back to the OS (glibc ``malloc_trim``), so that memory a block
    reuses from earlier work shows up as growth of the resident set; a no-op elsewhere."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim if sys.platform.startswith("linux") else False
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Any = None


def _hwm_kb() -> int:
    try:
        return _status_kb("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


_ACTIVE: list[PeakMemory] = []


class PeakMemory:
    """Peak memory a block of code adds, in MiB (``.mb``), without a sampling thread.

    CPU: the peak resident set size above the size at entry, from ``/proc/self/status`` VmHWM after
    resetting it through ``/proc/self/clear_refs`` (Linux; at entry the C allocator's free pages are
    handed back with glibc ``malloc_trim``, so memory the block reuses from earlier work counts as
    growth); elsewhere the growth of
    ``getrusage().ru_maxrss`` (0 when the block stays below an earlier peak of the process). CUDA
    (when available): the larger of that and ``torch.cuda.max_memory_allocated`` above its value at
    entry. Probes nest: an inner probe hands the peak it saw to the probes around it before it
    resets the counter. ``method`` says which CPU counter was used. ``collect=False`` skips the
    ``gc.collect()`` at entry (it costs ~0.1 s once torch is imported: pass False when timing many calls).
    """

    def __init__(self, *, cuda: bool | None = None, collect: bool = True) -> None:
        self.mb = 0.0
        self._cuda = cuda
        self._collect = collect

    def __enter__(self) -> PeakMemory:
        if self._collect:
            gc.collect()
            _release_free_memory()
        if self._cuda is None:
            self._cuda = "torch" in sys.modules and sys.modules["torch"].cuda.is_available()
        if self._cuda:
            import torch

            torch.cuda.synchronize()
            self._cuda_base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        hwm = _hwm_kb()
        for outer in _ACTIVE:  # the counter is about to be reset: keep what the outer probes have seen
            outer._peak_kb = max(outer._peak_kb, hwm)
        if sys.platform.startswith("linux") and _reset_hwm():
            self.method = "VmHWM"
            self._start = _status_kb("VmRSS")
        else:
            self.method = "ru_maxrss"
            self._start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self._peak_kb = self._start
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        end = _status_kb("VmHWM") if self.method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for outer in _ACTIVE:
            outer._peak_kb = max(outer._peak_kb, end)
        self.mb = max(0, max(end, self._peak_kb) - self._start) / 1024.0
        if self._cuda:
            import torch

            torch.cuda.synchronize()
            self.mb = max(self.mb, (torch.cuda.max_memory_allocated() - self._cuda_base) / 2**20)


# ------------------------------------------------------------------------------------ timing
def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``(fn(), seconds, peak MiB)`` of one call (wall clock; peak from :class:`PeakMemory`)."""
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        out = fn()
        sec = time.perf_counter() - t0
    return out, sec, mem.mb


@dataclass
class TimingStats:
    """Wall times of repeated calls, the largest peak memory of one call (MiB) and the last result."""

    times: list[float]
    peak_mb: float = 0.0
    result: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def pct(self, q: float) -> float:
        """The ``q``-th percentile of the times (linear interpolation)."""
        xs = sorted(self.times)
        if not xs:
            return float("nan")
        pos = (len(xs) - 1) * q / 100.0
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    @property
    def median(self) -> float:
        return self.pct(50)

    @property
    def p20(self) -> float:
        return self.pct(20)

    @property
    def p80(self) -> float:
        return self.pct(80)


def time_fn(
    fn: Callable[[], Any],
    *,
    device: Any = None,
    warmup: int = 0,
    repeats: int = 1,
    max_repeats: int | None = None,
    budget: float = 0.0,
    max_seconds: float = math.inf,
    memory: bool = True,
    collect: bool = True,
) -> TimingStats:
    """Time ``fn``: ``warmup`` untimed calls, then at least ``repeats`` timed ones, more (up to
    ``max_repeats``) while the timed calls have used less than ``budget`` seconds; no new call starts
    once warm-up plus timed calls have used ``max_seconds`` (one timed call at least).

    On a CUDA ``device`` each call is timed with CUDA events and the peak is the device's
    ``max_memory_allocated`` growth; on the CPU, wall clock and :class:`PeakMemory` (``memory=False``:
    no probe, peak 0). ``collect=False``: ``gc.collect()`` before the first timed call only, not before
    each (for many repeats of a fast call, whose ``budget`` would otherwise go to the collector).
    """
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    cuda = dev.type == "cuda"
    t_begin = time.perf_counter()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(dev)
    cap = max(repeats, max_repeats if max_repeats is not None else repeats)
    times: list[float] = []
    peak, out = 0.0, None
    t_timed = time.perf_counter()
    while len(times) < cap:
        out = None
        if cuda:
            with PeakMemory(cuda=True, collect=collect or not times) as mem:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                out = fn()
                e1.record()
                e1.synchronize()
            times.append(e0.elapsed_time(e1) / 1e3)
        else:
            with PeakMemory(cuda=False, collect=collect or not times) if memory else _Null() as mem:
                t0 = time.perf_counter()
                out = fn()
                times.append(time.perf_counter() - t0)
        peak = max(peak, getattr(mem, "mb", 0.0))
        now = time.perf_counter()
        if now - t_begin >= max_seconds:
            break
        if len(times) >= repeats and now - t_timed >= budget:
            break
    return TimingStats(times, peak, out)


class _Null:
    def __enter__(self) -> _Null:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


# ------------------------------------------------------------------------------------ numbers and tables
def fmt(x: Any, digits: int = 3) -> str:
    """A number for a table: ``—`` for None/NaN, scientific notation for very small or large floats."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, float):
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
            return f"{x:.{digits - 1}e}"
        return f"{x:.{digits}f}"
    return str(x)


def pm(mean: float | None, std: float | None = None, digits: int = 3) -> str:
    """``mean ± std`` (``mean`` alone when ``std`` is None or 0; ``—`` when ``mean`` is None)."""
    if mean is None:
        return "—"
    return fmt(mean, digits) if not std else f"{fmt(mean, digits)} ± {fmt(std, digits)}"


def _cell(c: Any) -> str:
    return " ".join(str(c).replace("|", "/").split())


def markdown_table(headers: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table: first column left-aligned, the others right-aligned."""
    out = [
        "| " + " | ".join(_cell(h) for h in headers) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|",
    ]
    out += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def text_table(headers: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """An aligned plain-text table (first column left, the others right) with a dashed rule."""
    cells = [[str(h) for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *(line(r) for r in cells[1:])])


# ------------------------------------------------------------------------------------ provenance
def git_commit(root: str | os.PathLike | None = None) -> str:
    """Short commit of the checkout at ``root`` (``-dirty`` when tracked files changed); ``""`` if none."""
    where = str(root) if root is not None else str(Path(__file__).resolve().parent.parent)
    try:
        sha = subprocess.run(
            ["git", "-C", where, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if not sha:
            return ""
        dirty = subprocess.run(
            ["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def version_string(*, commit: bool = True) -> str:
    """``fastinf <version>[+<commit>] torch <v> [cuda <v>] [triton <v>]``."""
    parts = [f"fastinf {__version__}"]
    sha = git_commit() if commit else ""
    if sha:
        parts[0] += f"+{sha}"
    if "torch" in sys.modules or _importable("torch"):
        import torch

        parts.append(f"torch {torch.__version__}")
        if torch.version.cuda:
            parts.append(f"cuda {torch.version.cuda}")
    if "triton" in sys.modules or _importable("triton"):
        try:
            import triton

            parts.append(f"triton {triton.__version__}")
        except Exception:  # noqa: BLE001 - a broken triton install must not stop a report
            pass
    return " ".join(parts)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def device_string(device: Any = None) -> str:
    """The GPU's name for a CUDA device; otherwise ``cpu (<model>, <cores> cores, torch threads=<k>)``."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu ({cpu}, {os.cpu_count()} cores, torch threads={torch.get_num_threads()})"


def loadavg() -> str:
    """The 1/5/15-minute load averages (other processes make timings noisier)."""
    try:
        return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"
