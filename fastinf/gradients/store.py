"""``GradientStore``: an on-disk GradientSet — a directory of safetensors shards + a JSON manifest.

Layout::

    store/
      manifest.json           format, fastinf version, capture fingerprint (model class, adapter
                              config, adapter weights' SHA-256, block names and dims, dtype, projection
                              and seed), n, complete, and one entry per shard
                              {file, n, bytes, sha256, data_sha256}
      shard-00000.safetensors one tensor per block, (n_shard, d_l)
      ...

Writes are atomic: a shard is written to a temporary file, fsynced and renamed; then the manifest is
rewritten the same way. A capture killed at any point leaves at most an orphan temporary file or an
unlisted shard, both ignored and overwritten on resume, so resuming yields a store bit-identical to
an uninterrupted run. No pickle anywhere.

A store knows what it holds, and refuses to stand for anything else:

* its **model**: a store whose fingerprint differs from the capture's refuses to mix unless
  ``overwrite=True``; :func:`check_same_model` refuses a train/test pair captured from different
  models or adapters (estimators call it on the stores they are given);
* its **data**: every shard records ``data_sha256``, the :func:`batch_digest` of the batch it was
  computed from (every tensor of the batch, with its key, dtype and shape). Re-running a capture
  (to resume it, or on a complete store) recomputes the digests — no forward pass — and refuses
  other data, fewer or more rows, unless ``overwrite=True``; identical data reuses the shards;
* its **completeness**: :meth:`GradientStore.open` refuses an interrupted capture unless
  ``allow_incomplete=True``;
* its **integrity**: every shard's size and SHA-256 are checked on first read (a truncated or
  corrupted shard raises an error naming it); re-running the capture checks every shard and
  recomputes and rewrites the damaged ones, with a logged warning naming them.

``GradientStore.open(path)`` is a :class:`GradientSet` whose blocks are read lazily from the shards
(one block at a time, kept in a small cache), so estimators that work block by block never hold
more than one block of the training gradients in memory.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..utils import atomic_write
from ..version import __version__
from .gradient_set import GradientSet, _first_bad_example, chunk_range

__all__ = ["GradientStore", "StoreError", "batch_digest", "check_same_model"]

log = logging.getLogger("fastinf")

FORMAT = "fastinf-gradient-store"
# 2: shards record data_sha256, fingerprints the adapter weights' SHA-256 (version 1 stores stay readable)
FORMAT_VERSION = 2
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


class _LazyBlocks(Mapping):
    """name -> (n, d_l) tensor, concatenated from the shards on access (small LRU cache)."""

    def __init__(self, store: GradientStore, dtype: torch.dtype | None, device: Any, cache: int = 2) -> None:
        self._store, self._dtype, self._device = store, dtype, device
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._size = cache

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._store._dims:
            raise KeyError(name)
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        t = self._store._read_block(name).to(device=self._device, dtype=self._dtype)
        self._cache[name] = t
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return t

    def __iter__(self):
        return iter(self._store._dims)

    def __len__(self) -> int:
        return len(self._store._dims)


class GradientStore(GradientSet):
    """On-disk per-example gradients (see the module docstring). Create with :meth:`create`, read with
    :meth:`open`; ``LoRAGradientCollector.collect(loader, store=path)`` does both."""

    __slots__ = ("path", "manifest", "_dims", "_verified", "_view", "_starts")

    def __init__(self, path: str | os.PathLike, manifest: dict, *, dtype=None, device=None) -> None:
        # no GradientSet.__init__: blocks are lazy
        self.path = Path(path)
        self.manifest = manifest
        self._dims: dict[str, int] = dict(manifest["blocks"])
        self._verified: set[str] = set()
        self._view = (dtype, device)
        self._starts: list[int] | None = None
        self._blocks = _LazyBlocks(self, dtype, device)

    # ------------------------------------------------------------------------------ creation
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        collector_or_fingerprint: Any,
        *,
        overwrite: bool = False,
    ) -> GradientStore:
        """Create (or reopen for resuming) a store for a capture.

        ``collector_or_fingerprint``: a :class:`LoRAGradientCollector` or a fingerprint dict with at
        least ``"blocks"`` (name -> dim) and ``"dtype"``. An existing store with the same fingerprint
        is reopened for writing, complete or not (an incomplete one is not refused here: this is how
        a capture resumes; :meth:`fill` then checks its shards against the data); a different one
        raises unless ``overwrite=True`` (then it is wiped).

        Raises:
            StoreError: the directory holds a store of another capture (and not ``overwrite``), or
                is a non-empty directory that is not a store, or holds an unreadable manifest.
            TypeError: ``collector_or_fingerprint`` is neither.
        """
        fp = collector_or_fingerprint
        if hasattr(fp, "fingerprint"):
            fp = fp.fingerprint()
        if not isinstance(fp, Mapping) or "blocks" not in fp or "dtype" not in fp:
            raise TypeError("create() needs a LoRAGradientCollector or a fingerprint dict with 'blocks' and 'dtype'")
        fp = json.loads(json.dumps(fp))  # normalise (tuples -> lists, key order as given)
        path = Path(path)
        mpath = path / MANIFEST
        if mpath.exists():
            old = cls._read_manifest(path)
            if old.get("fingerprint") == fp and not overwrite:
                return cls(path, old)
            if not overwrite and old.get("format_version", 1) < 2:
                raise StoreError(
                    f"{path} was written by an older fastinf (store format {old.get('format_version', 1)}), whose "
                    "shards do not record their data, so it cannot be checked or resumed; pass overwrite=True "
                    "to recompute it, or use another directory"
                )
            if not overwrite:
                diff = sorted(
                    k for k in set(fp) | set(old.get("fingerprint", {})) if fp.get(k) != old["fingerprint"].get(k)
                )
                raise StoreError(
                    f"{path} holds a capture with different arguments (differs in {diff}); "
                    "pass overwrite=True to replace it, or use another directory"
                )
            shutil.rmtree(path)
        elif path.exists() and any(path.iterdir()) and not overwrite:
            raise StoreError(f"{path} exists, is not empty and is not a gradient store; refusing to write into it")
        path.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "fastinf_version": __version__,
            "fingerprint": fp,
            "blocks": dict(fp["blocks"]),
            "dtype": fp["dtype"],
            "n": 0,
            "complete": False,
            "shards": [],
        }
        atomic_write(mpath, json.dumps(manifest, indent=1).encode(), durable=True)
        return cls(path, manifest)

    @classmethod
    def open(cls, path: str | os.PathLike, *, allow_incomplete: bool = False) -> GradientStore:
        """Open an existing store for reading (lazily).

        Args:
            path: the store directory.
            allow_incomplete: also open a store whose capture was interrupted (it holds only the
                rows captured so far).

        Raises:
            StoreError: not a store (no or invalid manifest, newer format); the capture did not finish
                (unless ``allow_incomplete``: "store X is incomplete: 208 rows, capture not finished;
                re-run the capture to resume, or pass allow_incomplete=True"); no rows at all.
        """
        path = Path(path)
        manifest = cls._read_manifest(path)
        if not manifest.get("complete", False) and not allow_incomplete:
            raise StoreError(
                f"store {path} is incomplete: {manifest['n']} rows, capture not finished; "
                "re-run the capture to resume, or pass allow_incomplete=True"
            )
        if not manifest["shards"]:
            raise StoreError(f"{path}: the store holds no examples yet")
        return cls(path, manifest)

    @staticmethod
    def _read_manifest(path: Path) -> dict:
        mpath = path / MANIFEST
        if not mpath.exists():
            raise StoreError(f"{path} is not a gradient store (no {MANIFEST})")
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise StoreError(f"{mpath} is not valid JSON ({e})") from None
        if manifest.get("format") != FORMAT:
            raise StoreError(f"{mpath} is not a {FORMAT} manifest")
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise StoreError(
                f"{mpath} has format version {manifest['format_version']}; this fastinf reads ≤ {FORMAT_VERSION}"
            )
        return manifest

    # ------------------------------------------------------------------------------ writing
    def append(self, blocks: Mapping[str, torch.Tensor], *, data_sha256: str | None = None) -> None:
        """Append one shard (atomically): name -> (N, d_l) for every block of the store.

        ``data_sha256``: the :func:`batch_digest` of the batch the rows were computed from (what
        :meth:`fill` records and later checks the data against); a shard without it cannot be checked,
        so a capture re-run on it refuses (``overwrite=True`` recomputes).

        Raises:
            ValueError: blocks that do not match the store's names or widths, ragged row counts,
                non-finite values.
        """
        idx = len(self.manifest["shards"])
        data, n_new = self._encode(blocks, idx, self.n_stored)
        fname = f"shard-{idx:05d}.safetensors"
        atomic_write(self.path / fname, data, durable=True)
        entry = {"file": fname, "n": n_new, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        if data_sha256 is not None:
            entry["data_sha256"] = data_sha256
        self.manifest["shards"].append(entry)
        self.manifest["n"] += n_new
        self._write_manifest()

    def _rewrite_shard(self, idx: int, blocks: Mapping[str, torch.Tensor]) -> None:
        """Recompute shard ``idx`` in place (atomically) from freshly computed ``blocks``."""
        e = self.manifest["shards"][idx]
        row0 = sum(s["n"] for s in self.manifest["shards"][:idx])
        data, n_new = self._encode(blocks, idx, row0)
        if n_new != e["n"]:  # pragma: no cover - fill() checked the batch's rows against the shard's
            raise StoreError(f"{self.path}: batch {idx} gave {n_new} rows, shard {idx} holds {e['n']}")
        atomic_write(self.path / e["file"], data, durable=True)
        self._verified.discard(e["file"])
        sha = hashlib.sha256(data).hexdigest()
        if (len(data), sha) != (e["bytes"], e["sha256"]):  # e.g. non-deterministic kernels on a GPU
            e["bytes"], e["sha256"] = len(data), sha
            self._write_manifest()

    def _encode(self, blocks: Mapping[str, torch.Tensor], idx: int, row0: int) -> tuple[bytes, int]:
        """Validate one shard's blocks and serialise them: (safetensors bytes, rows)."""
        from safetensors.torch import save

        if set(blocks) != set(self._dims):
            raise ValueError(f"append: blocks {sorted(blocks)} do not match the store's {sorted(self._dims)}")
        dtype = getattr(torch, self.manifest["dtype"])
        n_new = None
        tensors = {}
        for name in self._dims:
            t = blocks[name]
            if t.dim() != 2 or t.shape[1] != self._dims[name]:
                raise ValueError(f"append: block {name!r} must be (N, {self._dims[name]}), got {tuple(t.shape)}")
            if n_new is None:
                n_new = t.shape[0]
            elif t.shape[0] != n_new:
                raise ValueError("append: blocks have different numbers of examples")
            bad = _first_bad_example(t)
            if bad is not None:
                raise ValueError(f"block {name!r}: non-finite gradient for example {row0 + bad} of the capture")
            tensors[name] = t.detach().to(device="cpu", dtype=dtype).contiguous()
        data = save(tensors, metadata={"format": f"{FORMAT}/{idx}"})  # one key: deterministic header
        return data, int(n_new)

    def _write_manifest(self) -> None:
        atomic_write(self.path / MANIFEST, json.dumps(self.manifest, indent=1).encode(), durable=True)

    def mark_complete(self) -> None:
        """Record that the capture finished (:meth:`open` then reads the store without ``allow_incomplete``)."""
        if not self.manifest.get("complete"):
            self.manifest["complete"] = True
            self._write_manifest()

    @property
    def n_stored(self) -> int:
        return int(self.manifest["n"])

    def fill(self, collector: Any, dataloader: Iterable, *, progress: bool = True) -> GradientStore:
        """Capture every batch of ``dataloader`` not yet stored (resume), one shard per batch.

        Every batch is first checked against the shard that already claims to hold it (its
        :func:`batch_digest` and row count: no forward pass), so a re-run resumes an interrupted
        capture, reuses a complete store of the same data without recomputing anything, and refuses
        other data. A stored shard whose file is missing, truncated or corrupted is recomputed from
        its batch and rewritten atomically, with a warning (logger ``"fastinf"``) naming it. Returns
        the complete store, opened for reading.

        Raises:
            StoreError: the data differs from what the store holds: a batch with other content or
                rows than its shard ("shard 3 holds other data than batch 3"), fewer or more rows in
                all ("the store holds 20 rows, the data 5"), or a shard that recorded no data digest;
                each message ends in "pass overwrite=True" (recompute the store from scratch).
            ValueError: the dataloader yielded no batches.
        """
        from tqdm.auto import tqdm

        shards = self.manifest["shards"]
        stored, complete = len(shards), bool(self.manifest.get("complete"))
        rows = batches = 0
        mismatch: str | None = None  # the first difference; after it, batches are only counted
        repaired: list[str] = []
        total = len(dataloader) if hasattr(dataloader, "__len__") else None
        bar = tqdm(
            dataloader,
            total=total,
            desc=f"per-example gradients -> {self.path.name}",
            unit="batch",
            disable=not progress,
        )
        rows_known = True  # False once a batch's rows could not be told (a batch without tensors)
        for i, batch in enumerate(bar):
            batches = i + 1
            size = _batch_size(batch, strict=False)
            if mismatch is None and i >= stored and not complete:  # not stored yet: capture it
                digest = batch_digest(batch)
                grads = collector.batch_gradients(batch)
                self.append(grads, data_sha256=digest)
                rows += next(iter(grads.values())).shape[0]
                continue
            if mismatch is None and i < stored:
                e = shards[i]
                if e.get("data_sha256") is None:
                    raise StoreError(
                        f"{self.path}: shard {i} records no digest of its data (written by an older fastinf or by "
                        "append() without data_sha256), so it cannot be checked against the data; "
                        "pass overwrite=True to recompute the store"
                    )
                if size is not None and e["n"] != size:
                    mismatch = (
                        f"shard {i} holds other data than batch {i} ({e['n']} rows vs {size}: other data, or the "
                        "same data in batches of another size)"
                    )
                elif e["data_sha256"] != batch_digest(batch):
                    mismatch = f"shard {i} holds other data than batch {i} (same {e['n']} rows, other content)"
                else:
                    rows += e["n"]
                    problem = self._shard_problem(e)
                    if problem is not None:
                        self._rewrite_shard(i, collector.batch_gradients(batch))
                        repaired.append(e["file"])
                        log.warning("%s: %s; recomputed it from batch %d", self._shard_path(e), problem, i)
                    continue
            elif mismatch is None:  # a complete store, and the data goes on
                mismatch = f"the store holds {stored} batches, the data more"
            # after the first difference the remaining batches are only counted, for the message
            if size is None:
                rows_known = False
            else:
                rows += size
        if batches == 0 and stored == 0:
            raise ValueError("the dataloader yielded no batches: nothing to capture")
        if mismatch is not None or batches < stored:
            if rows_known and rows != self.n_stored and (complete or rows < self.n_stored):
                what = f"the store holds {self.n_stored} rows, the data {rows}"
            else:
                what = mismatch or f"the store holds {stored} batches, the data {batches}"
            state = "" if complete else " (an unfinished capture)"
            raise StoreError(
                f"{self.path}{state}: {what}; pass overwrite=True to recompute the store from this data, "
                "or use another directory"
            )
        if len(repaired) > 1:
            log.warning("%s: rewrote %d damaged shard(s): %s", self.path, len(repaired), ", ".join(repaired))
        self.mark_complete()
        return GradientStore.open(self.path)

    # ------------------------------------------------------------------------------ reading
    def _shard_path(self, entry: dict) -> Path:
        return self.path / entry["file"]

    def _shard_problem(self, entry: dict) -> str | None:
        """Why a shard's file does not match its manifest entry (missing, size, SHA-256), or None."""
        p = self._shard_path(entry)
        if not p.exists():
            return "shard listed in the manifest is missing"
        size = p.stat().st_size
        if size != entry["bytes"]:
            return f"shard is truncated or was modified ({size} bytes, manifest says {entry['bytes']})"
        if _sha256(p) != entry["sha256"]:
            return "shard checksum mismatch (the file is corrupted)"
        return None

    def _check_shard(self, entry: dict) -> Path:
        p = self._shard_path(entry)
        if entry["file"] in self._verified:
            return p
        problem = self._shard_problem(entry)
        if problem is not None:
            raise StoreError(f"{p}: {problem}")
        self._verified.add(entry["file"])
        return p

    def verify(self) -> None:
        """Check every shard's size and SHA-256 (raises :class:`StoreError` naming the bad shard)."""
        for e in self.manifest["shards"]:
            self._check_shard(e)

    def _read_block(self, name: str, shards: list[dict] | None = None) -> torch.Tensor:
        from safetensors import safe_open

        parts = []
        for e in shards if shards is not None else self.manifest["shards"]:
            p = self._check_shard(e)
            try:
                with safe_open(str(p), framework="pt") as f:
                    parts.append(f.get_tensor(name))
            except Exception as ex:  # safetensors raises several types on corrupt files
                raise StoreError(f"{p}: cannot read block {name!r} ({ex})") from None
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    # ------------------------------------------------------------------------------ GradientSet API
    @property
    def n(self) -> int:
        return self.n_stored

    @property
    def names(self) -> list[str]:
        return list(self._dims)

    @property
    def dims(self) -> dict[str, int]:
        return dict(self._dims)

    @property
    def dim(self) -> int:
        return sum(self._dims.values())

    @property
    def dtype(self) -> torch.dtype:
        return self._view[0] or getattr(torch, self.manifest["dtype"])

    @property
    def device(self) -> torch.device:
        return torch.device(self._view[1] or "cpu")

    def __repr__(self) -> str:
        return f"GradientStore({str(self.path)!r}, n={self.n}, blocks={len(self._dims)}, dtype={self.dtype})"

    def to(self, device=None, dtype=None) -> GradientStore:
        """A lazy view converting blocks to ``device``/``dtype`` as they are read."""
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"GradientStore.to: dtype must be floating, got {dtype}")
        return GradientStore(self.path, self.manifest, dtype=dtype or self._view[0], device=device or self._view[1])

    def subset(self, index) -> GradientSet:
        """Rows selected by ``index``, read from the shards that hold them (in memory)."""
        if isinstance(index, slice):
            start, stop, step = index.indices(self.n)
            if step == 1:
                return self._rows(start, stop)
        idx = torch.arange(self.n)[torch.as_tensor(index) if not isinstance(index, slice) else index]
        if idx.numel() == 0:
            raise ValueError("subset: empty selection")
        lo, hi = int(idx.min()), int(idx.max()) + 1
        part = self._rows(lo, hi)
        return part.subset(idx - lo)

    def _shard_starts(self) -> list[int]:
        """First row of every shard, plus n at the end (cached; the shard list only grows)."""
        shards = self.manifest["shards"]
        starts = self._starts
        if starts is None or len(starts) != len(shards) + 1:
            starts = [0]
            for e in shards:
                starts.append(starts[-1] + int(e["n"]))
            self._starts = starts
        return starts

    def _rows(self, start: int, stop: int) -> GradientSet:
        """Rows ``[start, stop)`` of every block, read from the shards that overlap them only (each
        opened once); converted to the view's dtype/device, else in the stored dtype."""
        from safetensors import safe_open

        if not 0 <= start < stop <= self.n:
            raise ValueError(f"rows [{start}, {stop}) out of range for a store of {self.n} rows")
        starts = self._shard_starts()
        shards = self.manifest["shards"]
        first = bisect.bisect_right(starts, start) - 1
        out: dict[str, list[torch.Tensor]] = {k: [] for k in self._dims}
        for i in range(first, len(shards)):
            s0, s1 = starts[i], starts[i + 1]
            if s0 >= stop:
                break
            if s1 <= start:
                continue
            e = shards[i]
            p = self._check_shard(e)
            a, b = max(start, s0) - s0, min(stop, s1) - s0
            try:
                with safe_open(str(p), framework="pt") as f:
                    for k in self._dims:
                        out[k].append(f.get_slice(k)[a:b])
            except Exception as ex:  # safetensors raises several types on corrupt files
                raise StoreError(f"{p}: cannot read rows {a}..{b} ({ex})") from None
        dtype, device = self._view
        return GradientSet(
            {k: (v[0] if len(v) == 1 else torch.cat(v)).to(device=device, dtype=dtype) for k, v in out.items()},
            validate=False,
        )

    def iter_chunks(self, size: int, *, start: int = 0, stop: int | None = None):
        """Rows ``[start, stop)`` (default: all) in chunks of ``size`` rows: yields ``(offset, chunk)``,
        ``chunk`` an in-memory :class:`GradientSet` of rows ``offset .. offset + len(chunk)``.

        Each chunk is read from the shards that overlap it only, each shard opened once per chunk
        (all blocks at once); no whole ``(n, d_l)`` block is ever formed. Memory: O(size · D) for the
        chunk being yielded (plus the previous one while the caller still holds it). Rows keep the
        stored dtype unless this store is a ``.to(dtype=...)`` view (then each chunk is converted).

        Raises:
            ValueError: ``size`` < 1, or not ``0 <= start <= stop <= n``.
            StoreError: a shard is missing, truncated or corrupted (checked on its first read).
        """
        start, stop = chunk_range(self.n, size, start, stop)
        for s in range(start, stop, size):
            yield s, self._rows(s, min(s + size, stop))

    def load(self) -> GradientSet:
        """The whole store in memory."""
        return self._rows(0, self.n)


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
