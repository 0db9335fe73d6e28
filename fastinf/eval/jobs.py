"""The library functions behind the command line: one per command that is not an experiment.

* :func:`system_info` (``fastinf info``): versions, compute backends, devices, methods, bundled data;
* :func:`capture_jsonl` (``fastinf grads``): per-example LoRA gradients of a JSON-lines file into a store;
* :func:`score_stores` (``fastinf score``): one method on a train store against a test store, to a file;
* :func:`run_benchmark` (``fastinf bench``): a script of the checkout's ``bench/`` directory.

Each validates its input with a one-line ``ValueError`` naming the argument.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..distributed import barrier, is_main
from ..estimators import available_methods, get_estimator, method_info
from ..gradients import GradientStore, LoRAGradientCollector, check_same_model
from ..ops import backends as ops_backends
from ..utils import atomic_write
from ..version import __version__

__all__ = ["BENCHMARKS", "capture_jsonl", "run_benchmark", "score_stores", "system_info"]

BENCHMARKS = ("estimators", "capture", "traces", "ops", "scale", "store_dtype", "kfac")
SCORE_FORMATS = (".safetensors", ".csv")


# ------------------------------------------------------------------------------------ info
def system_info() -> dict[str, Any]:
    """Versions, compute backends (and why one is unavailable), CUDA devices, methods and bundled data."""
    import numpy

    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            prop = torch.cuda.get_device_properties(i)
            devices.append(
                {
                    "index": i,
                    "name": prop.name,
                    "memory_gib": round(prop.total_memory / 2**30, 1),
                    "capability": f"{prop.major}.{prop.minor}",
                }
            )
    return {
        "fastinf": __version__,
        "fastinf_path": str(Path(__file__).resolve().parent.parent),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "numpy": numpy.__version__,
        "torch_threads": torch.get_num_threads(),
        "backends": ops_backends(),
        "cuda_devices": devices,
        "methods": available_methods(),
        "data": _data_report(),
    }


def _data_report() -> dict[str, Any]:
    try:
        from ..data import data_report

        return data_report()
    except Exception as e:  # noqa: BLE001 - info must always print
        return {"error": {"found": False, "install": f"{type(e).__name__}: {e}"}}


def format_info(info: dict[str, Any]) -> str:
    """:func:`system_info` as the text ``fastinf info`` prints."""
    cuda = f"CUDA {info['torch_cuda']}" if info["torch_cuda"] else "CPU-only build"
    lines = [
        f"fastinf   {info['fastinf']}  ({info['fastinf_path']})",
        f"python    {info['python']}  ({info['platform']})",
        f"torch     {info['torch']}  ({cuda}, {info['torch_threads']} threads)",
        f"numpy     {info['numpy']}",
        "backends:",
        *[f"  {name:<8}{state}" for name, state in info["backends"].items()],
        "CUDA devices:",
    ]
    if not info["cuda_devices"]:
        lines.append("  none")
    for d in info["cuda_devices"]:
        lines.append(f"  cuda:{d['index']}  {d['name']}  {d['memory_gib']} GiB  (compute capability {d['capability']})")
    lines += [f"methods:  {', '.join(info['methods'])}", "models and data:"]
    for name, d in (info.get("data") or {}).items():
        where = d.get("path") or ""
        state = "found" if d.get("found") else f"MISSING ({d.get('install', 'see requirements-data.txt')})"
        ver = f" {d['version']}" if d.get("version") else ""
        extra = f", cache {d['cache']} ({'ready' if d.get('cached') else 'built on first use'})" if "cache" in d else ""
        lines.append(f"  {name:<16}{d.get('package', '')}{ver}: {state}  {where}{extra}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ grads
def read_jsonl(
    path: str | Path, *, required: Sequence[str], validate: Callable[[dict[str, Any]], str | None] | None = None
) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file.

    Raises:
        ValueError: the file is missing or empty, a line is not a JSON object, or a row lacks a
            ``required`` field (the message names the line and the fields it has), or ``validate(row)``
            returns a complaint about a row.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"data file {path} is a directory; expected a JSON-lines file")
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; expected JSON lines: one object per line") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path} line {i} column {e.colno}: {e.msg}; expected JSON lines: one object per line"
            ) from None
        if not isinstance(row, dict):
            raise ValueError(
                f"{path} line {i} holds a JSON {type(row).__name__}; expected JSON lines: one object per line"
            )
        missing = [f for f in required if f not in row]
        if missing:
            raise ValueError(f"{path} line {i} has no field {', '.join(map(repr, missing))} (fields: {sorted(row)})")
        problem = validate(row) if validate is not None else None
        if problem:
            raise ValueError(f"{path} line {i}: {problem}")
        rows.append(row)
    if not rows:
        raise ValueError(f"data file {path} has no rows")
    return rows


def capture_jsonl(
    model: str,
    data: str | Path,
    out: str | Path,
    *,
    adapter: str | Path | None = None,
    text_field: str = "text",
    label_field: str = "label",
    num_labels: int = 2,
    r: int = 8,
    batch_size: int = 16,
    max_length: int = 128,
    projection: int | None = None,
    targets: Sequence[str] | None = None,
    overwrite: bool = False,
    seed: int = 0,
    progress: bool = True,
    factors: bool = False,
) -> GradientStore:
    """Per-example LoRA gradients of every row of a JSON-lines file into a resumable GradientStore.

    ``model``: ``"minilm"`` or a local ``*ForSequenceClassification`` model directory (a classifier:
    ``label_field`` holds the class; its head's gradients are captured too), ``"smollm2"`` or any other
    local Hugging Face model directory (a causal LM: the loss on every text token); see
    :func:`fastinf.eval.hf.lora_model`. ``adapter``: a saved peft adapter directory; otherwise a fresh,
    seeded adapter of rank ``r`` on ``targets``. Re-running the same call resumes an interrupted
    capture; a store made with other data or arguments is refused unless ``overwrite``. Inside a
    torch.distributed process group every rank calls this with the same arguments and captures its
    share of the batches into the same store. ``factors``: also store every block's Kronecker factors
    (``collect(..., factors=True)``), which the ``kfac`` / ``ekfac`` methods need on a training store.

    Raises:
        ValueError: missing file or fields, unknown model, a store made with other arguments,
            ``factors`` with a ``projection``.
    """
    from . import hf

    known = model == "minilm"  # a bundled classifier: check the labels before loading anything
    label = label_field if known else None
    rows = read_jsonl(
        data,
        required=[text_field] + ([label_field] if known else []),
        validate=_row_check(text_field, label, num_labels),
    )
    tok, net, classifier = hf.lora_model(model, adapter=adapter, r=r, seed=seed, num_labels=num_labels, targets=targets)
    if classifier and not known:  # a model directory's own head decides the classes; still before any store
        n_cls = int(getattr(net.config, "num_labels", num_labels))
        read_jsonl(data, required=[text_field, label_field], validate=_row_check(text_field, label_field, n_cls))
    loader = hf.JsonlLoader(
        rows,
        tok,
        text_field=text_field,
        label_field=label_field if classifier else None,
        batch_size=batch_size,
        max_length=max_length,
    )
    col = LoRAGradientCollector(net, include_modules_to_save=classifier, projection=projection)
    return col.collect(loader, store=out, progress=progress, overwrite=overwrite, factors=factors)


def _row_check(text_field: str, label_field: str | None, num_labels: int) -> Callable[[dict[str, Any]], str | None]:
    """A row validator: the text a string, the label (if any) an integer class in [0, num_labels)."""

    def check(row: dict[str, Any]) -> str | None:
        if not isinstance(row[text_field], str):
            return f"field {text_field!r} is not a string"
        if label_field is not None:
            y = row[label_field]
            if isinstance(y, bool) or not isinstance(y, int) or not 0 <= y < num_labels:
                return (
                    f"label {label_field!r} = {y!r} is not a class in 0..{num_labels - 1} (num_labels = {num_labels})"
                )
        return None

    return check


# ------------------------------------------------------------------------------------ score
def score_stores(
    train: str | Path,
    test: str | Path,
    out: str | Path,
    *,
    method: str = "datainf",
    reduce: str | None = None,
    topk: int | None = None,
    smallest: bool = False,
    damping: float | str = "auto",
    allow_mismatch: bool = False,
    allow_incomplete: bool = False,
) -> dict[str, Any]:
    """Score a training store against a test store with one gradient method and write the result.

    Output (by ``out``'s suffix): ``.safetensors`` with ``scores`` (m, n) — or (n,) with
    ``reduce="mean"`` — or, with ``topk``, ``values`` and ``indices`` (m, k) (never forming (m, n));
    ``.csv`` writes the scores (or the values, plus ``<out>.indices.csv``). Positive = harmful. Under
    torch.distributed (torchrun) each rank scores its share of the training rows; the merged result is
    written by rank 0.
    Returns ``{"method", "files", "shapes", "description"}``. The stores must come from the same
    model and adapter and be complete, unless ``allow_mismatch`` / ``allow_incomplete``.

    Raises:
        ValueError: unknown method, an option that does not apply (``reduce`` with ``topk``,
            ``smallest`` without ``topk``), an unsupported output suffix; ``StoreError`` (a
            ValueError) for unreadable, incomplete or mismatched stores.
    """
    grad_methods = available_methods("gradients")
    if method not in grad_methods:
        raise ValueError(f"method must be one of {', '.join(grad_methods)}, got {method!r}")
    if topk is not None and reduce is not None:
        raise ValueError("reduce does not apply with topk (top-k is taken per test example)")
    if smallest and topk is None:
        raise ValueError("smallest applies only with topk")
    out = Path(out)
    if out.suffix not in SCORE_FORMATS:
        raise ValueError(f"output {out} must end in {' or '.join(SCORE_FORMATS)}")
    train_store = GradientStore.open(train, allow_incomplete=allow_incomplete)
    test_store = GradientStore.open(test, allow_incomplete=allow_incomplete)
    if not allow_mismatch:
        check_same_model(train_store, test_store)  # before any gradient is read
    opts: dict[str, Any] = {"damping": damping} if method_info(method).uses_damping else {}
    est = get_estimator(method, allow_mismatch=allow_mismatch, **opts).fit(train_store)
    if topk is not None:
        vals, idx = est.topk(test_store, topk, largest=not smallest)
        tensors = {"values": vals.float().contiguous(), "indices": idx.contiguous()}
        kind = "most helpful" if smallest else "most harmful"
        description = f"per test example (rows), the {topk} {kind} training examples: values and indices"
    else:
        tensors = {"scores": est.score(test_store, reduce=reduce, gather=True).float().contiguous()}
        description = (
            "influence of each training example on the mean test loss (n,)"
            if reduce == "mean"
            else "rows = test examples, columns = training examples"
        )
    files = [out]
    if not is_main():  # under torchrun: every rank scored its rows; the merged result is written once
        barrier()
        return {"method": method, "files": [], "shapes": {k: tuple(v.shape) for k, v in tensors.items()},
                "description": description}  # fmt: skip
    if out.suffix == ".csv":
        import numpy as np

        key = "scores" if "scores" in tensors else "values"
        atomic_write(out, _csv(np.atleast_2d(tensors[key].numpy()), "%.9g"))
        if "indices" in tensors:
            files.append(out.with_suffix(".indices.csv"))
            atomic_write(files[-1], _csv(tensors["indices"].numpy(), "%d"))
    else:
        from safetensors.torch import save

        meta = {"method": method, "sign": "positive = harmful", "reduce": str(reduce), "description": description}
        atomic_write(out, save(tensors, metadata=meta))
    barrier()
    return {
        "method": method,
        "files": [str(f) for f in files],
        "shapes": {k: tuple(v.shape) for k, v in tensors.items()},
        "description": description,
    }


def _csv(a: Any, fmt: str) -> str:
    import io

    import numpy as np

    buf = io.StringIO()
    np.savetxt(buf, a, delimiter=",", fmt=fmt)
    return buf.getvalue()


# ------------------------------------------------------------------------------------ bench
def bench_dir() -> Path:
    """The checkout's ``bench/`` directory (benchmarks are not part of the installed package)."""
    return Path(__file__).resolve().parents[2] / "bench"


def run_benchmark(which: str, argv: Sequence[str] = ()) -> int:
    """Run ``bench/bench_<which>.py``'s ``main(argv)`` in this process; returns its exit status.

    Raises:
        ValueError: an unknown benchmark, or no ``bench/`` directory (an installed package without
            the checkout).
    """
    if which not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {which!r}; choose from {', '.join(BENCHMARKS)}")
    path = bench_dir() / f"bench_{which}.py"
    if not path.is_file():
        raise ValueError(f"{path} not found: the benchmarks live in the repository checkout's bench/ directory")
    here = str(path.parent)
    added = here not in sys.path
    if added:
        sys.path.insert(0, here)  # the scripts import their shared bench/utils.py
    try:
        spec = importlib.util.spec_from_file_location(f"fastinf_bench_{which}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses and pickling look the module up by name
        spec.loader.exec_module(module)
        rc = module.main(list(argv))
    finally:
        sys.modules.pop(f"fastinf_bench_{which}", None)
        if added:
            sys.path.remove(here)
    return int(rc or 0)
