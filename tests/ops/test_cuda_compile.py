"""The CUDA sources compile, on a machine without a GPU: nvcc compiles every ``csrc/*.cu`` to an object for
sm_90 with the build's own flags (no ``-std``: nvcc's default), with csrc, a stub folder and torch's base
include folder on the include path (the .cu files need only CUDA headers today; the stub stands in for the
``c10/cuda/impl/cuda_cmake_macros.h`` that CPU torch wheels lack, should one include c10's CUDA headers).
A syntax or type error in CUDA code fails the suite. Skipped where nvcc is not installed. Also: the build
description and its failure cache.

``bindings.cpp`` needs the full torch C++ API (about 35 s of g++); it is checked when
``FASTINF_CHECK_BINDINGS=1`` (C++ standard read off torch's extension builder) and always by the JIT build on
a GPU machine (bench/gpu_check.sh).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fastinf._ext import build

NVCC = build.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
CU_FILES = [p for p in build.sources() if p.suffix == ".cu"]


def _compile(src: Path, out_dir: Path, include_dirs: list[Path]) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    cmd = build.nvcc_check_command(NVCC, src, out_dir / (src.stem + ".o"), include_dirs)
    r = subprocess.run(cmd, capture_output=True, text=True)
    return r.returncode, f"$ {' '.join(cmd)}\n{r.stdout}{r.stderr}", time.perf_counter() - t0


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Compile every .cu once, in parallel; {file name: (return code, output, seconds)}."""
    out = tmp_path_factory.mktemp("nvcc")
    inc = build.check_include_dirs(out / "stub")
    with ThreadPoolExecutor(max_workers=max(1, min(len(CU_FILES), os.cpu_count() or 1))) as pool:
        results = pool.map(lambda p: (p.name, _compile(p, out, inc)), CU_FILES)
        return dict(results)


def test_there_are_cuda_sources():
    names = {p.name for p in CU_FILES}
    assert {"lora_per_sample_grads.cu", "datainf_inverse_sum.cu", "rrinf_row_updates.cu"} <= names


@needs_nvcc
@pytest.mark.parametrize("name", [p.name for p in CU_FILES])
def test_cu_compiles(name, compiled):
    rc, output, seconds = compiled[name]
    assert rc == 0, f"nvcc failed on csrc/{name} ({seconds:.1f} s):\n{output[-6000:]}"
    assert "warning" not in output.lower(), output[-4000:]


@needs_nvcc
def test_compile_check_catches_errors(tmp_path):
    """The same command fails on a broken source (so the check above can fail)."""
    bad = tmp_path / "broken.cu"
    bad.write_text('#include "launchers.h"\n__global__ void k(float* x) { x[0] = fastinf::no_such_thing(; }\n')
    rc, output, _ = _compile(bad, tmp_path, [build.csrc_dir()])
    assert rc != 0 and "error" in output


@pytest.mark.skipif(os.environ.get("FASTINF_CHECK_BINDINGS") != "1", reason="set FASTINF_CHECK_BINDINGS=1 (~35 s)")
def test_bindings_compile(tmp_path):
    import shutil

    cxx = shutil.which("g++") or shutil.which("c++")
    std = build.torch_cxx_std()
    if cxx is None or std is None:
        pytest.skip("no C++ compiler, or torch's C++ standard could not be read off torch")
    inc = build.check_include_dirs(tmp_path / "stub")
    home = build.cuda_home()
    cuda_inc = home / "include" if home is not None else None
    cmd = [cxx, "-fsyntax-only", f"-std={std}", "-DTORCH_EXTENSION_NAME=fastinf_C"]
    for d in [*inc, build.torch_include_dir() / "torch" / "csrc" / "api" / "include", sysconfig.get_paths()["include"]]:
        cmd += ["-I", str(d)]
    if cuda_inc is not None:
        cmd += ["-I", str(cuda_inc)]
    cmd.append(str(build.csrc_dir() / "bindings.cpp"))
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-6000:]


# ------------------------------------------------------------------------------------ build description
def test_build_description_is_shared_with_setup_py():
    root = Path(__file__).resolve().parents[2]
    kw = build.extension_kwargs(root)
    assert kw["name"] == "fastinf._C"
    assert sorted(kw["sources"]) == sorted(str(p.relative_to(root)) for p in build.sources())
    assert any(s.endswith("bindings.cpp") for s in kw["sources"])
    assert not any(f.startswith("-std") for f in kw["extra_compile_args"]["nvcc"] + kw["extra_compile_args"]["cxx"])
    setup_text = (root / "setup.py").read_text()
    assert "extension_kwargs" in setup_text and "FASTINF_BUILD_CUDA" in setup_text


def test_cache_dir_and_key(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTINF_CACHE", str(tmp_path / "c"))
    assert build.cache_dir() == tmp_path / "c"
    k1, k2 = build.build_key(), build.build_key()
    assert k1 == k2 and len(k1) == 16
    assert build.build_dir() == tmp_path / "c" / "ext" / k1
    monkeypatch.delenv("FASTINF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert build.cache_dir() == tmp_path / "x" / "fastinf"


def test_build_failure_is_cached(monkeypatch, tmp_path):
    """A failed JIT build raises with the reason, leaves a FAILED log, and is not retried (until asked)."""
    import torch
    import torch.utils.cpp_extension as ce

    monkeypatch.setenv("FASTINF_CACHE", str(tmp_path))
    monkeypatch.delenv("FASTINF_REBUILD", raising=False)
    monkeypatch.setenv("CUDA_HOME", "/usr/local/cuda")
    monkeypatch.setattr(build, "_module", None)
    monkeypatch.setattr(build, "_error", None)
    monkeypatch.setattr(build, "_prebuilt_available", lambda: False)
    monkeypatch.setattr(build, "find_nvcc", lambda: "/usr/local/cuda/bin/nvcc")
    monkeypatch.setattr(build.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")  # a CUDA build of torch
    calls = []

    def boom(**kw):
        calls.append(kw)
        raise RuntimeError("Error building extension 'fastinf_C': error: expected an expression")

    monkeypatch.setattr(ce, "load", boom)
    with pytest.raises(RuntimeError, match="expected an expression"):
        build.load()
    assert len(calls) == 1 and calls[0]["build_directory"] == str(build.build_dir())
    assert "-O3" in calls[0]["extra_cuda_cflags"] and not any("-std" in f for f in calls[0]["extra_cuda_cflags"])
    marker = build.build_dir() / "FAILED"
    assert "expected an expression" in marker.read_text()
    with pytest.raises(RuntimeError, match="failed"):  # same process: remembered
        build.load()
    monkeypatch.setattr(build, "_error", None)  # a new process: the FAILED file is found
    assert "failed earlier" in build.why_unavailable()
    with pytest.raises(RuntimeError, match="failed earlier"):
        build.load()
    assert len(calls) == 1
    monkeypatch.setenv("FASTINF_REBUILD", "1")
    monkeypatch.setattr(build, "_error", None)
    assert build.why_unavailable() is None
    with pytest.raises(RuntimeError):
        build.load()
    assert len(calls) == 2


def test_build_module_imports_only_the_standard_library():
    """setup.py loads fastinf/_ext/build.py by path before torch may be importable."""
    code = (
        "import importlib.util, sys; "
        "spec = importlib.util.spec_from_file_location('b', 'fastinf/_ext/build.py'); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "assert 'torch' not in sys.modules and 'fastinf' not in sys.modules"
    )
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr
