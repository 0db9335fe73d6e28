"""The one build description of fastinf's CUDA extension (``csrc/``), and its lazy JIT loader.

Used three ways, so that they cannot drift apart:

* :func:`load` — JIT build with ninja through ``torch.utils.cpp_extension.load`` on first GPU use, cached
  under :func:`cache_dir` (``$FASTINF_CACHE``, else ``$XDG_CACHE_HOME/fastinf``, else ``~/.cache/fastinf``)
  in a folder keyed by the sources, flags and torch/CUDA versions. A build failure is cached too (a
  ``FAILED`` file with the compiler output next to the build); ``FASTINF_REBUILD=1`` retries it. An
  ahead-of-time build (``fastinf._C``) is used instead when it is installed.
* ``setup.py`` with ``FASTINF_BUILD_CUDA=1`` — the ahead-of-time build: it loads this file by path and calls
  :func:`extension_kwargs`.
* ``tests/ops/test_cuda_compile.py`` — nvcc compile check of every ``csrc/*.cu`` on a machine without a GPU:
  :func:`nvcc_check_command`, :func:`check_include_dirs`.

Only the standard library is imported at module level (setup.py imports this before torch may be there).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("fastinf.ext")

JIT_NAME = "fastinf_C"  # module name of the JIT build
AOT_NAME = "fastinf._C"  # module name of the ahead-of-time build (setup.py)
NVCC_FLAGS = ["-O3", "-lineinfo"]  # no -std: torch's build adds the standard it was built with
CXX_FLAGS = ["-O3"]
CHECK_ARCH = "sm_90"  # the compile check's target (H100/H200)

_lock = threading.Lock()
_module = None
_error: str | None = None


# ---------------------------------------------------------------------------------------------- sources
def csrc_dir() -> Path:
    """Folder of the CUDA sources: the installed copy (``fastinf/csrc``) or the checkout's ``csrc/``."""
    pkg = Path(__file__).resolve().parents[1]
    for cand in (pkg / "csrc", pkg.parent / "csrc"):
        if cand.is_dir() and any(cand.glob("*.cu")):
            return cand
    raise FileNotFoundError(f"no CUDA sources (csrc/*.cu) next to {pkg}")


def sources(root: Path | None = None) -> list[Path]:
    """The translation units: every ``*.cu`` (one per op family) and ``*.cpp`` (bindings), sorted."""
    root = csrc_dir() if root is None else root
    return sorted(root.glob("*.cu")) + sorted(root.glob("*.cpp"))


def headers(root: Path | None = None) -> list[Path]:
    root = csrc_dir() if root is None else root
    return sorted(p for p in root.iterdir() if p.suffix in (".h", ".cuh"))


def extension_kwargs(root: Path) -> dict:
    """Keyword arguments of ``torch.utils.cpp_extension.CUDAExtension`` for the AOT build (paths relative
    to ``root``, the directory holding ``setup.py``)."""
    src = root / "csrc"
    return {
        "name": AOT_NAME,
        "sources": [str(p.relative_to(root)) for p in sources(src)],
        "include_dirs": [str(src)],
        "extra_compile_args": {"cxx": list(CXX_FLAGS), "nvcc": list(NVCC_FLAGS)},
    }


# ------------------------------------------------------------------------------------------------ cache
def cache_dir() -> Path:
    env = os.environ.get("FASTINF_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fastinf"


def build_key() -> str:
    """Hash of everything the build depends on: sources, flags, python, torch, CUDA and target archs."""
    import torch

    h = hashlib.sha256()
    for p in sources() + headers():
        h.update(p.name.encode())
        h.update(p.read_bytes())
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if not arch and torch.cuda.is_available():
        arch = "{}.{}".format(*torch.cuda.get_device_capability())
    for part in (NVCC_FLAGS, CXX_FLAGS, sys.version_info[:2], torch.__version__, torch.version.cuda, arch):
        h.update(repr(part).encode())
    return h.hexdigest()[:16]


def build_dir() -> Path:
    return cache_dir() / "ext" / build_key()


def find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").exists():
            return str(Path(root) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def cuda_home() -> Path | None:
    """The CUDA toolkit root (holding include/cuda_runtime.h), from CUDA_HOME / CUDA_PATH or nvcc's place."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = find_nvcc()
    if nvcc:
        cands.append(str(Path(nvcc).resolve().parents[1]))
    cands.append("/usr/local/cuda")
    for c in cands:
        if c and (Path(c) / "include" / "cuda_runtime.h").exists():
            return Path(c)
    return None


def _prebuilt_available() -> bool:
    try:
        return importlib.util.find_spec(AOT_NAME) is not None
    except (ImportError, ValueError):
        return False


def why_unavailable() -> str | None:
    """Why the extension cannot be loaded or built here (cheap: builds nothing), or None."""
    if _error is not None:
        return _error
    if _module is not None or _prebuilt_available():
        return None
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build: the CUDA extension cannot be built or loaded"
    try:
        csrc_dir()
    except FileNotFoundError as e:
        return str(e)
    if find_nvcc() is None:
        return "the CUDA extension is not prebuilt and nvcc was not found (set CUDA_HOME) to JIT-build it"
    if importlib.util.find_spec("ninja") is None and shutil.which("ninja") is None:
        return "the CUDA extension is not prebuilt and ninja (needed to JIT-build it) is not installed"
    failed = _failed_marker()
    if failed is not None and failed.exists() and os.environ.get("FASTINF_REBUILD") != "1":
        return f"building the CUDA extension failed earlier (log: {failed}; FASTINF_REBUILD=1 retries)"
    return None


def _failed_marker() -> Path | None:
    try:
        return build_dir() / "FAILED"
    except Exception:  # noqa: BLE001 - no torch / no sources: nothing cached
        return None


# ------------------------------------------------------------------------------------------------- load
def load(verbose: bool = False):
    """The compiled extension module: the AOT build if installed, else the cached JIT build (built now,
    with a message, if needed). Raises RuntimeError with the reason (and caches it) on failure."""
    global _module, _error
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise RuntimeError(_error)
        if _prebuilt_available():
            _module = importlib.import_module(AOT_NAME)
            return _module
        why = why_unavailable()
        if why is not None:
            _error = why
            raise RuntimeError(why)
        bdir = build_dir()
        bdir.mkdir(parents=True, exist_ok=True)
        marker = bdir / "FAILED"
        if marker.exists():  # FASTINF_REBUILD=1
            marker.unlink()
        home = cuda_home()
        if home is not None and not os.environ.get("CUDA_HOME"):  # torch reads it when cpp_extension is imported
            os.environ["CUDA_HOME"] = str(home)
        from torch.utils.cpp_extension import load as _jit_load

        t0 = time.perf_counter()
        log.warning("fastinf: building the CUDA extension in %s (first use; takes a minute or two) ...", bdir)
        try:
            _module = _jit_load(
                name=JIT_NAME,
                sources=[str(p) for p in sources()],
                extra_cflags=list(CXX_FLAGS),
                extra_cuda_cflags=list(NVCC_FLAGS),
                extra_include_paths=[str(csrc_dir())],
                build_directory=str(bdir),
                verbose=verbose,
            )
        except Exception as e:  # noqa: BLE001 - compiler errors come as RuntimeError, missing tools as others
            text = f"{type(e).__name__}: {e}"
            marker.write_text(text)
            _error = f"building the CUDA extension failed (log: {marker}; FASTINF_REBUILD=1 retries): {text[:2000]}"
            log.error("fastinf: %s", _error)
            raise RuntimeError(_error) from e
        log.warning("fastinf: CUDA extension ready (%.0f s)", time.perf_counter() - t0)
        return _module


# ---------------------------------------------------------------------------------------- compile check
CUDA_MACROS_STUB = (
    "#pragma once\n// stub for a CPU-only torch wheel (fastinf compile check)\n#define C10_CUDA_BUILD_SHARED_LIBS\n"
)


def torch_include_dir() -> Path:
    """torch's base include folder (not torch/csrc/api/include: the kernels need only ATen/c10 headers)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("torch is not installed")
    return Path(spec.origin).parent / "include"


def check_include_dirs(stub_root: Path) -> list[Path]:
    """Include folders for compiling csrc/*.cu without a CUDA torch: csrc, a stub folder (for the
    ``c10/cuda/impl/cuda_cmake_macros.h`` that CPU wheels lack; written under ``stub_root`` if needed)
    and torch's base include folder."""
    inc = torch_include_dir()
    dirs = [csrc_dir()]
    if not (inc / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        stub = stub_root / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text(CUDA_MACROS_STUB)
        dirs.append(stub_root)
    dirs.append(inc)
    return dirs


def nvcc_check_command(nvcc: str, source: Path, obj: Path, include_dirs: list[Path], arch: str = CHECK_ARCH):
    """A real compile of one .cu to an object for one architecture, with the build's own nvcc flags."""
    cmd = [nvcc, "-c", str(source), "-o", str(obj), f"-arch={arch}", *NVCC_FLAGS]
    for d in include_dirs:
        cmd += ["-I", str(d)]
    return cmd


def torch_cxx_std() -> str | None:
    """The C++ standard torch's extension builder passes (e.g. ``c++20``), read off torch; None if unknown."""
    try:
        import torch.utils.cpp_extension as ce

        found = re.findall(r"-std=(c\+\+\d+)", Path(ce.__file__).read_text())
    except Exception:  # noqa: BLE001
        return None
    return max(found, key=lambda s: int(s[3:])) if found else None
