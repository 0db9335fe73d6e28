"""fastinf build script.

The default install is pure Python: no torch in the build requirements, nothing compiled.
The CUDA sources in ``csrc/`` ship as package data (``fastinf/csrc``) and are JIT-built with
ninja on first GPU use. ``FASTINF_BUILD_CUDA=1 pip install .`` opts into an ahead-of-time build
of the same sources (needs torch with CUDA and nvcc in the build environment).
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithCsrc(build_py):
    """Copy the top-level ``csrc/`` into the built package as ``fastinf/csrc``."""

    def run(self):
        super().run()
        src = ROOT / "csrc"
        if src.is_dir() and not self.editable_mode:
            dst = Path(self.build_lib) / "fastinf" / "csrc"
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst)


cmdclass = {"build_py": BuildPyWithCsrc}
ext_modules = []

if os.environ.get("FASTINF_BUILD_CUDA") == "1":
    # the same build description as the lazy JIT build (fastinf/_ext/build.py), loaded by path so that
    # nothing of fastinf is imported here
    import importlib.util

    spec = importlib.util.spec_from_file_location("_fastinf_build", ROOT / "fastinf" / "_ext" / "build.py")
    _build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(_build)
    if not _build.sources(ROOT / "csrc"):
        raise SystemExit("FASTINF_BUILD_CUDA=1 but csrc/ holds no CUDA sources")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension  # noqa: E402

    ext_modules.append(CUDAExtension(**_build.extension_kwargs(ROOT)))
    cmdclass["build_ext"] = BuildExtension

setup(cmdclass=cmdclass, ext_modules=ext_modules)
