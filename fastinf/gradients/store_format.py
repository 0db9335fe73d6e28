"""The gradient store's format: constants, :class:`StoreError`, fingerprints and their comparison
(:func:`check_same_model`), batch digests, storage dtypes, new manifests, per-row sums of squares.

Pure helpers without store state, shared by :mod:`.store` (the store itself) and :mod:`.store_capture`
(filling a store from a dataloader); see :mod:`.store` for the guarantees.

Layout (format 3)::

    store/
      manifest.json            format, format_version, fastinf_version, fingerprint (model class,
                               adapter config, adapter weights' SHA-256, loss, block names and dims,
                               gradient dtype, projection and seed, and store_dtype when it differs
                               from the gradient dtype), blocks, dtype (the storage dtype),
                               shard_bytes, n, complete, and one entry per shard, in row order:
                               {file, n, bytes, sha256, batches: [{n, data_sha256}, ...],
                               sq_sums: {block: Σ_i ‖g_il‖² of the shard's rows as stored, float64}}
                               (sq_sums is optional: stores written before it lack it)
      shard-00000.safetensors  one tensor per block, (n_shard, d_l) in the storage dtype; header
                               metadata "fastinf-gradient-store/<index>/<fingerprint id>"
      ...
      shard-r1of2-00000.safetensors, part-r1of2.json
                               a distributed capture's rank 1 of 2, until rank 0 merges the parts into
                               manifest.json (the rank shards stay, listed there; the parts go)

Shards are sized in bytes: :meth:`GradientStore.append` buffers batches and writes a shard once the
buffer holds ``shard_bytes`` (default 256 MiB), so 10⁶ examples make ~64 files of 256 MiB in bf16 at
D = 8192, not one file per batch. Each shard lists the batches it holds (rows and :func:`batch_digest`
each), so a capture can still be checked batch by batch.

Each shard also records the per-block sums of squares of its rows as stored (``sq_sums``: per-row
float64 sums added exactly with ``math.fsum`` when the shard is written, see :func:`_sq_sum`);
:meth:`GradientStore.block_sq_sums` adds them up, so an estimator's ``damping="auto"`` needs no pass over
the rows of a store that has them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..version import __version__
from .gradient_set import _first_bad_example

if TYPE_CHECKING:
    from .store import GradientStore

FORMAT = "fastinf-gradient-store"
# 2: shards record data_sha256, fingerprints the adapter weights' SHA-256 (version 1 stores stay readable)
# 3: shards sized in bytes hold several batches ({n, data_sha256} each); storage dtype; rank parts
FORMAT_VERSION = 3
MANIFEST = "manifest.json"


class StoreError(ValueError):
    """A gradient store that is missing, corrupted, truncated or incompatible."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _feed(h: Any, x: Any) -> None:
    """Feed a canonical, type-tagged encoding of ``x`` into the hash ``h`` (see :func:`batch_digest`)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
        h.update(f"T{str(t.dtype).replace('torch.', '')}{tuple(t.shape)}:".encode())
        if t.numel():
            t = t.to("cpu").contiguous().reshape(-1)
            h.update(memoryview(t.view(torch.uint8).numpy()))
    elif isinstance(x, Mapping):
        h.update(f"M{len(x)}:".encode())
        for k in sorted(x, key=str):
            _feed(h, str(k))
            _feed(h, x[k])
    elif isinstance(x, (list, tuple)):
        h.update(f"L{len(x)}:".encode())
        for v in x:
            _feed(h, v)
    elif isinstance(x, str):
        b = x.encode()
        h.update(f"S{len(b)}:".encode() + b)
    elif x is None or isinstance(x, (bool, int, float)):
        h.update(f"V{x!r};".encode())
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        h.update(f"D{type(x).__qualname__}:".encode())
        _feed(h, {f.name: getattr(x, f.name) for f in dataclasses.fields(x)})
    elif hasattr(x, "__array__") and hasattr(x, "dtype") and hasattr(x, "shape"):  # numpy arrays
        import numpy as np

        a = np.ascontiguousarray(x)
        h.update(f"A{a.dtype}{tuple(a.shape)}:".encode())
        h.update(memoryview(a.reshape(-1).view(np.uint8)))
    else:  # opaque objects: only their type counts
        h.update(f"O{type(x).__module__}.{type(x).__qualname__};".encode())


def batch_digest(batch: Any) -> str:
    """SHA-256 (hex) of everything a batch holds: what a store's shard records as ``data_sha256``.

    Covers every tensor of the batch (``input_ids``, ``attention_mask``, ``labels``, ``pixel_values``,
    ``index``, ...) with its key, dtype, shape and bytes, in sorted key order (so the dict's order does
    not matter), and strings, numbers, lists, tuples, dataclasses, numpy arrays and nested mappings by
    value; other objects count by their type only (a batch of such objects cannot be told apart).
    Cheap: no forward pass; tensors are hashed on the CPU.
    """
    h = hashlib.sha256()
    _feed(h, batch)
    return h.hexdigest()


def _short(v: Any) -> str:
    r = repr(v) if not isinstance(v, str) else v
    return r if len(r) <= 40 else r[:37] + "..."


def _model_differences(a: Mapping, b: Mapping) -> list[str]:
    """Short descriptions of how two capture fingerprints differ in model or adapter (empty: the same)."""
    out: list[str] = []
    for k in ("model_class", "name_or_path"):
        if a.get(k) != b.get(k):
            what = "model classes" if k == "model_class" else "base models"
            out.append(f"different {what}: {_short(a.get(k))} vs {_short(b.get(k))}")
    ca, cb = a.get("adapter_config") or {}, b.get("adapter_config") or {}
    if ca != cb:
        if not (isinstance(ca, Mapping) and isinstance(cb, Mapping)) or not all(
            isinstance(v, Mapping) for v in [*ca.values(), *cb.values()]
        ):
            out.append("different adapter configs")
        elif set(ca) != set(cb):
            out.append(f"different adapter names: {_short(sorted(ca))} vs {_short(sorted(cb))}")
        else:
            keys = sorted({kk for k in ca for kk in set(ca[k]) | set(cb[k]) if ca[k].get(kk) != cb[k].get(kk)})
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            out.append(f"different adapter configs (in {', '.join(keys[:3])}{more})")
    sa, sb = a.get("adapter_sha256"), b.get("adapter_sha256")
    if sa is not None and sb is not None:
        if sa != sb:
            out.append(f"different adapters: {sa[:12]} vs {sb[:12]} (SHA-256 of the adapter weights)")
    elif a.get("adapter_weight_abs_sum") != b.get("adapter_weight_abs_sum"):
        out.append(
            f"different adapters: weight |sums| {_short(a.get('adapter_weight_abs_sum'))} vs "
            f"{_short(b.get('adapter_weight_abs_sum'))}"
        )
    for k in ("projection", "projection_seed"):
        if a.get(k) != b.get(k):
            out.append(f"{k.replace('_', ' ')} {a.get(k)} vs {b.get(k)}")
    ba, bb = dict(a.get("blocks") or {}), dict(b.get("blocks") or {})
    if len(ba) != len(bb):
        out.append(f"{len(ba)} vs {len(bb)} blocks")
    elif list(ba) != list(bb):
        diff = [(x, y) for x, y in zip(ba, bb, strict=True) if x != y]
        out.append(f"{len(diff)} of {len(ba)} block names differ (e.g. {_short(diff[0][0])} vs {_short(diff[0][1])})")
    elif ba != bb:
        diff = [k for k in ba if ba[k] != bb[k]]
        k = diff[0]
        out.append(f"{len(diff)} of {len(ba)} blocks differ in width (e.g. {_short(k)}: {ba[k]} vs {bb[k]})")
    return out


def check_same_model(train: GradientStore | str | os.PathLike, test: GradientStore | str | os.PathLike) -> None:
    """Refuse a train/test pair of stores captured from different models or adapters.

    Compares the fingerprints their manifests record: model class, base model name, adapter config,
    adapter weights (SHA-256; older stores: the sum of |weights|), projection and its seed, and the
    block names and widths. The loss function and the storage dtype may differ.

    Args:
        train, test: :class:`GradientStore` objects, or store directories.

    Raises:
        StoreError: the fingerprints differ; one line summing up the differences (e.g.
            ``"different adapters: 1a2b3c4d5e6f vs 9f8e7d6c5b4a"``, ``"26 vs 120 blocks"``), never a
            list of block names, ending in "pass allow_mismatch=True" (``--allow-mismatch`` on the CLI).
    """
    from .store import GradientStore  # the store module builds on this one: imported at call time

    fps = []
    for st in (train, test):
        man = st.manifest if isinstance(st, GradientStore) else GradientStore._read_manifest(Path(st))
        fps.append((Path(st.path if isinstance(st, GradientStore) else st), man.get("fingerprint") or {}))
    (pa, fa), (pb, fb) = fps
    diffs = _model_differences(fa, fb)
    if diffs:
        raise StoreError(
            f"the train store {pa} and the test store {pb} were captured from different models: "
            f"{'; '.join(diffs)}; pass allow_mismatch=True to use them together anyway"
        )


DEFAULT_SHARD_BYTES = 256 << 20
_ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
STORE_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _dtype_name(dt: torch.dtype | str) -> str:
    """'bfloat16' for torch.bfloat16 or 'bfloat16'; TypeError for anything but a floating dtype."""
    name = str(dt).replace("torch.", "")
    if name not in STORE_DTYPES:
        raise TypeError(f"store_dtype must be torch.bfloat16, torch.float16 or torch.float32, got {dt!r}")
    return name


def _dtype(name: str, what: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise TypeError(f"{what} must name a floating torch dtype, got {name!r}")
    return dt


def _fingerprint_id(fp: Mapping) -> str:
    """A short digest of a capture fingerprint (written into every shard's header)."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def _new_manifest(fp: dict, shard_bytes: int) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fastinf_version": __version__,
        "fingerprint": fp,
        "blocks": dict(fp["blocks"]),
        "dtype": fp.get("store_dtype", fp["dtype"]),
        "shard_bytes": int(shard_bytes),
        "n": 0,
        "complete": False,
        "shards": [],
    }


def _bad_row(t: torch.Tensor) -> int | None:
    """The first row of ``t`` holding NaN/inf, or None: one reduction when all is finite (a sum in
    float32 is finite then, unless it overflows: only then are the rows checked one by one)."""
    if t.numel() == 0 or math.isfinite(float(t.sum(dtype=torch.float32))):
        return None
    return _first_bad_example(t)


_SQ_ELEMS = 1 << 20  # float64 elements converted at a time by _sq_sum (8 MiB)


def _sq_sum(pieces: Sequence[torch.Tensor]) -> float:
    """Σ t² over the rows of (rows, d) CPU tensors, as a shard records it per block (``sq_sums``).

    Each row's sum of squares is taken in float64 (a few rows at a time: never a float64 copy of more
    than ``_SQ_ELEMS`` elements) and the row sums are added with ``math.fsum`` (exactly rounded), so the
    value does not depend on how the rows are grouped into pieces: a shard rewritten from one tensor
    records the same bits as the same rows written from many appends.
    """
    rows: list[float] = []
    for t in pieces:
        if t.numel() == 0:
            continue
        step = max(1, _SQ_ELEMS // max(t.shape[1], 1))
        for s in range(0, t.shape[0], step):
            x = t[s : s + step].to(torch.float64)  # a view when t is float64: never modify it in place
            rows.extend((x * x).sum(dim=1).tolist())
    return math.fsum(rows)


def serialise_shard(
    pieces: Mapping[str, list[torch.Tensor]], idx: int, fingerprint: Mapping, extra: Mapping[str, torch.Tensor] | None
) -> bytearray:
    """One shard's safetensors bytes from each block's row pieces (CPU, contiguous, storage dtype),
    written straight into one buffer (no concatenated copy of the rows), plus ``extra`` whole tensors
    (the shard's Kronecker-factor sums, float64). The header holds one metadata key (the format, the
    shard's index and the capture's fingerprint id, so a shard copied in from another store is
    recognised); tensors are laid out in name order: deterministic bytes."""
    pieces = {**pieces, **{k: [t] for k, t in (extra or {}).items()}}
    meta = {"format": f"{FORMAT}/{idx}/{_fingerprint_id(fingerprint or {})}"}
    header: dict[str, Any] = {"__metadata__": meta}
    names = sorted(pieces)
    off = 0
    for k in names:
        ts = pieces[k]
        rows, width = sum(t.shape[0] for t in ts), ts[0].shape[1]
        nbytes = rows * width * ts[0].element_size()
        header[k] = {"dtype": _ST_DTYPE[ts[0].dtype], "shape": [rows, width], "data_offsets": [off, off + nbytes]}
        off += nbytes
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    out = bytearray(8 + len(h) + off)
    out[:8] = len(h).to_bytes(8, "little")
    out[8 : 8 + len(h)] = h
    pos, mv = 8 + len(h), memoryview(out)
    for k in names:
        for t in pieces[k]:
            if t.numel():
                b = t.contiguous().reshape(-1).view(torch.uint8).numpy()
                mv[pos : pos + b.size] = b
                pos += b.size
    return out


def _entry_batches(e: Mapping) -> list[dict]:
    """The batches a shard holds, [{n, data_sha256}] (format 2 shards held one batch each)."""
    b = e.get("batches")
    if b is not None:
        return b
    return [{"n": e["n"], "data_sha256": e.get("data_sha256")}]


def _os_message(e: OSError) -> str:
    return f"[Errno {e.errno}] {e.strerror}" if e.errno is not None and e.strerror else f"{type(e).__name__}: {e}"


def _batch_size(batch: Any, *, strict: bool = True) -> int | None:
    """Rows of a batch (the first dimension of its first tensor); None (``strict=False``) or a
    ValueError when the batch holds no tensor to tell."""
    if isinstance(batch, Mapping):
        for v in batch.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return int(v.shape[0])
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return int(batch[0].shape[0])
    if not strict:
        return None
    raise ValueError("cannot tell the batch size of a batch without tensors")
