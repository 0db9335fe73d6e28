"""``GradientStore``: an on-disk GradientSet — a directory of safetensors shards + a JSON manifest.

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

Each shard also records the per-block sums of squares of its rows as stored (``sq_sums``, summed in
float64 piece by piece when the shard is written); :meth:`GradientStore.block_sq_sums` adds them up, so
an estimator's ``damping="auto"`` needs no pass over the rows of a store that has them.

Writes are atomic: a shard is written to a temporary file, fsynced and renamed; then the manifest is
rewritten the same way (once per shard, never per append). A capture killed at any point loses at most
the buffered batches and leaves at most an orphan temporary file or an unlisted shard, both ignored
and overwritten on resume, which recomputes from the first batch not in a complete shard; shard
boundaries depend only on the batches and ``shard_bytes``, so the resumed store is bit-identical to an
uninterrupted run. An ``OSError`` while writing (a full disk) raises a :class:`StoreError` naming the
shard and the OS error; the manifest still lists only complete shards, and a re-run resumes. No
pickle anywhere.

Distributed capture (inside an initialised ``torch.distributed`` process group,
``collector.collect(loader, store=path)`` on every rank): rank r captures the r-th contiguous range of
the batches (:func:`fastinf.distributed.split_range`) into its own shards and part record; after all
ranks finish, rank 0 appends the parts' shard entries in batch order to ``manifest.json`` (one atomic
write), so the finished store equals a one-process capture: same examples in the same order, each row
the same bytes (only the shard boundaries differ). A killed rank's part resumes when every rank is
re-run with the same world size.

A store knows what it holds, and refuses to stand for anything else:

* its **model**: a store whose fingerprint differs from the capture's (another adapter, projection
  seed, storage dtype, ...) refuses to mix unless ``overwrite=True``, naming the differing keys;
  :func:`check_same_model` refuses a train/test pair captured from different models or adapters
  (estimators call it on the stores they are given); the ranks of a distributed capture must agree;
* its **data**: every batch's :func:`batch_digest` (every tensor of the batch, with its key, dtype and
  shape) and rows are recorded. Re-running a capture (to resume it, or on a complete store)
  recomputes the digests — no forward pass — and refuses other data, fewer or more rows, unless
  ``overwrite=True``; identical data reuses the shards;
* its **completeness**: :meth:`GradientStore.open` refuses an interrupted capture unless
  ``allow_incomplete=True``;
* its **integrity**: every shard's size and SHA-256 are checked on first read (a missing, truncated,
  corrupted or foreign shard — one copied from a store of another capture — raises an error naming
  it; ``open(..., checksums=False)`` checks existence and size only); re-running the capture checks
  every shard and recomputes and rewrites the damaged ones from their batches, with a logged warning
  naming them.

Reading and memory: ``GradientStore.open(path)`` is a :class:`GradientSet` whose rows stream.
:meth:`GradientStore.iter_chunks` ``(size, start=, stop=)`` reads rows ``[a, b)`` of every block
together from the shards that overlap them only (each opened once per chunk): memory O(size · D),
never a whole ``(n, d_l)`` block. ``store[name]`` still reads one whole block (kept in a two-block
cache) for code that works block by block; :meth:`~GradientStore.load` reads everything. Capture holds
at most ``shard_bytes`` of buffered rows plus one batch, and about as much again while a shard is
serialised.

Why one module of ~1,250 lines: every part of it (buffered appends, the manifest, resume and repair,
the data digests, the distributed part-merge, chunked reads) reads and writes the same manifest and
shard invariants through the private state of :class:`GradientStore`; the tests patch its writer
(``atomic_write``) to simulate crashes at every step. Splitting it (the pure helpers at the bottom and
the distributed merge are the candidates) is a follow-up, not done in the issue that grew it.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..utils import atomic_write
from ..version import __version__
from .gradient_set import GradientSet, _first_bad_example, chunk_range

__all__ = ["GradientStore", "StoreError", "batch_digest", "check_same_model"]

log = logging.getLogger("fastinf")

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

    __slots__ = (
        "path",
        "manifest",
        "shard_bytes",
        "_dims",
        "_verified",
        "_checksums",
        "_view",
        "_starts",
        "_buf",
        "_buf_bytes",
        "_mname",
        "_prefix",
    )

    def __init__(
        self,
        path: str | os.PathLike,
        manifest: dict,
        *,
        dtype=None,
        device=None,
        shard_bytes: int | None = None,
        manifest_name: str = MANIFEST,
        shard_prefix: str = "shard-",
    ) -> None:
        # no GradientSet.__init__: blocks are lazy
        self.path = Path(path)
        self.manifest = manifest
        self.shard_bytes = int(shard_bytes or manifest.get("shard_bytes") or DEFAULT_SHARD_BYTES)
        self._dims: dict[str, int] = dict(manifest["blocks"])
        self._verified: set[str] = set()
        self._checksums = True
        self._view = (dtype, device)
        self._starts: list[int] | None = None
        self._buf: list[tuple[dict[str, torch.Tensor], int, str | None]] = []
        self._buf_bytes = 0
        self._mname, self._prefix = manifest_name, shard_prefix
        self._blocks = _LazyBlocks(self, dtype, device)

    # ------------------------------------------------------------------------------ creation
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        collector_or_fingerprint: Any,
        *,
        overwrite: bool = False,
        store_dtype: torch.dtype | str | None = None,
        shard_bytes: int | None = None,
    ) -> GradientStore:
        """Create (or reopen for resuming) a store for a capture.

        Args:
            path: the store directory (created if missing).
            collector_or_fingerprint: a :class:`LoRAGradientCollector` or a fingerprint dict with at
                least ``"blocks"`` (name -> dim) and ``"dtype"`` (the gradients' dtype, e.g.
                ``"bfloat16"``).
            overwrite: wipe a directory that holds another capture (or anything else) first.
            store_dtype: the dtype rows are stored in (``torch.bfloat16``, ``torch.float16`` or
                ``torch.float32``; default: the gradients' dtype). Part of the fingerprint: a store
                of the same capture in another storage dtype is a different store.
            shard_bytes: rows are buffered by :meth:`append` and written as one shard once the buffer
                holds this many bytes (default 256 MiB for a new store; an existing store keeps the
                size it was created with, so a resumed capture cuts its shards where the first run
                did). ``1`` writes every append as its own shard.

        An existing store with the same fingerprint is reopened for writing, complete or not (an
        incomplete one is not refused here: this is how a capture resumes; :meth:`fill` then checks
        its shards against the data); a different one raises unless ``overwrite=True`` (then it is
        wiped).

        Raises:
            StoreError: the directory holds a store of another capture (names the differing
                fingerprint keys, e.g. ``['projection_seed']`` or ``['store_dtype']``; not with
                ``overwrite``), or is a non-empty directory that is not a store, or holds an
                unreadable manifest.
            TypeError: ``collector_or_fingerprint`` is neither; ``store_dtype`` is not a floating dtype.
            ValueError: ``shard_bytes`` < 1.
        """
        fp = collector_or_fingerprint
        if hasattr(fp, "fingerprint"):
            fp = fp.fingerprint()
        if not isinstance(fp, Mapping) or "blocks" not in fp or "dtype" not in fp:
            raise TypeError("create() needs a LoRAGradientCollector or a fingerprint dict with 'blocks' and 'dtype'")
        if shard_bytes is not None and (
            isinstance(shard_bytes, bool) or int(shard_bytes) != shard_bytes or shard_bytes < 1
        ):
            raise ValueError(f"shard_bytes must be a positive int, got {shard_bytes!r}")
        fp = json.loads(json.dumps(fp))  # normalise (tuples -> lists, key order as given)
        _dtype(fp["dtype"], "the fingerprint's dtype")
        if store_dtype is not None:
            sd = _dtype_name(store_dtype)
            if sd == fp["dtype"]:
                fp.pop("store_dtype", None)  # the default: the same fingerprint as a store without store_dtype
            else:
                fp["store_dtype"] = sd
        elif "store_dtype" in fp:
            fp["store_dtype"] = _dtype_name(fp["store_dtype"])
        path = Path(path)
        mpath = path / MANIFEST
        if mpath.exists():
            old = cls._read_manifest(path)
            if old.get("fingerprint") == fp and not overwrite:
                return cls(path, old, shard_bytes=shard_bytes)
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
        manifest = _new_manifest(fp, shard_bytes or DEFAULT_SHARD_BYTES)
        atomic_write(mpath, json.dumps(manifest, indent=1).encode(), durable=True)
        return cls(path, manifest)

    @classmethod
    def _create_for_capture(
        cls,
        path: str | os.PathLike,
        collector: Any,
        *,
        overwrite: bool = False,
        store_dtype: torch.dtype | str | None = None,
        shard_bytes: int | None = None,
    ) -> GradientStore:
        """:meth:`create` on every rank of a process group: the ranks' fingerprints must agree; rank 0
        creates (or wipes, or checks) the directory, the others then reopen it. One process: create."""
        if not distributed.is_distributed():
            return cls.create(path, collector, overwrite=overwrite, store_dtype=store_dtype, shard_bytes=shard_bytes)
        fp = collector.fingerprint() if hasattr(collector, "fingerprint") else collector
        fps = distributed.all_gather_objects(fp)
        for r, other in enumerate(fps[1:], start=1):
            if other != fps[0]:
                diffs = _model_differences(fps[0], other) or [
                    "differs in " + str(sorted(k for k in set(fps[0]) | set(other) if fps[0].get(k) != other.get(k)))
                ]
                raise StoreError(
                    f"{path}: the ranks capture with different arguments (rank 0 vs rank {r}: {'; '.join(diffs)}); "
                    "every rank must load the same model and adapter with the same options"
                )
        err = None
        if distributed.rank() == 0:
            try:
                cls.create(path, fp, overwrite=overwrite, store_dtype=store_dtype, shard_bytes=shard_bytes)
            except Exception as e:  # every rank raises the same error
                err = e
        msg = distributed.broadcast_object(None if err is None else (type(err).__name__, str(err)))
        if err is not None:
            raise err
        if msg is not None:
            raise (TypeError if msg[0] == "TypeError" else ValueError if msg[0] == "ValueError" else StoreError)(msg[1])
        return cls.create(path, fp, store_dtype=store_dtype, shard_bytes=shard_bytes)

    @classmethod
    def open(cls, path: str | os.PathLike, *, allow_incomplete: bool = False, checksums: bool = True) -> GradientStore:
        """Open an existing store for reading (lazily).

        Args:
            path: the store directory.
            allow_incomplete: also open a store whose capture was interrupted (it holds only the
                rows of the shards written so far; a distributed capture's rows appear when its
                ranks' records are merged, at the end).
            checksums: check every shard's SHA-256 on its first read (one extra pass over the shard,
                about 1 GB/s per core). ``False`` checks only that each shard exists and has its
                recorded size (a truncated or swapped file is still caught; a bit flip is not), for
                streaming passes where hashing would dominate; :meth:`verify` always hashes.

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
        st = cls(path, manifest)
        st._checksums = bool(checksums)
        return st

    @staticmethod
    def _read_manifest(path: Path, name: str = MANIFEST) -> dict:
        mpath = path / name
        if not mpath.exists():
            raise StoreError(f"{path} is not a gradient store (no {name})")
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
        """Append rows: name -> (N, d_l) for every block of the store, in any floating dtype (converted
        to the storage dtype here).

        The rows are buffered and written as one shard (atomically, with one manifest rewrite) once
        the buffer holds ``shard_bytes``; :meth:`flush` and :meth:`mark_complete` write the rest. Rows
        still in the buffer are lost if the process dies (a capture recomputes them on resume).
        Memory: the buffer, at most ``shard_bytes`` plus one append, and a transient copy of it while
        a shard is serialised.

        ``data_sha256``: the :func:`batch_digest` of the batch the rows were computed from (the shard
        records it per batch, and :meth:`fill` later checks the data against it); a batch without it
        cannot be checked, so a capture re-run on it refuses (``overwrite=True`` recomputes).

        Raises:
            ValueError: blocks that do not match the store's names or widths, ragged row counts,
                non-finite values (also after conversion: float16 overflows beyond 65504).
            StoreError: the shard this append completes could not be written (an ``OSError``, e.g. a
                full disk: the message names the shard and the OS error); the store on disk is
                unchanged and the rows stay buffered (:meth:`flush` retries).
        """
        row0 = self.n_stored + sum(b[1] for b in self._buf)
        tensors, n_new = self._prepare(blocks, row0)
        self._buf.append((tensors, n_new, data_sha256))
        self._buf_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        if self._buf_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one shard now (nothing to do when the buffer is empty).

        The shard goes to a temporary file that is fsynced and renamed; then the manifest is rewritten
        the same way to list it. A failure at any point leaves the manifest listing only complete
        shards.

        Raises:
            StoreError: an ``OSError`` while writing the shard or the manifest ("<store>/shard-00003
                .safetensors: could not write shard 3 (4096 rows): [Errno 28] No space left on device;
                ..."); the buffer is kept, so a later flush retries, and a re-run of the capture resumes
                after the last complete shard.
        """
        if not self._buf:
            return
        shards = self.manifest["shards"]
        idx = len(shards)
        fname = f"{self._prefix}{idx:05d}.safetensors"
        n_new = sum(b[1] for b in self._buf)
        data = self._serialise({k: [b[0][k] for b in self._buf] for k in self._dims}, idx)  # no concatenated copy
        try:
            atomic_write(self.path / fname, data, durable=True)
        except OSError as e:
            raise StoreError(
                f"{self.path / fname}: could not write shard {idx} ({n_new} rows): {_os_message(e)}; the store is "
                f"consistent (its manifest lists the {idx} complete shards, {self.n_stored} rows); free the space "
                "or fix the error and re-run the capture to resume"
            ) from e
        entry = {
            "file": fname,
            "n": n_new,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "batches": [{"n": n, "data_sha256": d} for _, n, d in self._buf],
            "sq_sums": {k: _sq_sum([b[0][k] for b in self._buf]) for k in self._dims},
        }
        shards.append(entry)
        self.manifest["n"] += n_new
        try:
            self._write_manifest()
        except OSError as e:
            shards.pop()
            self.manifest["n"] -= n_new
            raise StoreError(
                f"{self.path / self._mname}: could not record shard {idx} ({fname}, {n_new} rows) in the manifest: "
                f"{_os_message(e)}; the store is consistent (the manifest lists the {idx} complete shards, "
                f"{self.n_stored} rows); free the space or fix the error and re-run the capture to resume"
            ) from e
        self._verified.add(fname)
        self._buf, self._buf_bytes = [], 0

    def _rewrite_shard(self, idx: int, blocks: Mapping[str, torch.Tensor]) -> None:
        """Recompute shard ``idx`` in place (atomically) from freshly computed ``blocks``."""
        e = self.manifest["shards"][idx]
        row0 = sum(s["n"] for s in self.manifest["shards"][:idx])
        tensors, n_new = self._prepare(blocks, row0)
        if n_new != e["n"]:  # pragma: no cover - fill() checked the batches' rows against the shard's
            raise StoreError(f"{self.path}: recomputed {n_new} rows for shard {idx}, which holds {e['n']}")
        data = self._serialise({k: [t] for k, t in tensors.items()}, idx)
        try:
            atomic_write(self.path / e["file"], data, durable=True)
        except OSError as ex:
            raise StoreError(f"{self.path / e['file']}: could not rewrite the damaged shard: {_os_message(ex)}") from ex
        self._verified.discard(e["file"])
        sha = hashlib.sha256(data).hexdigest()
        sq = {k: _sq_sum([t]) for k, t in tensors.items()}
        if (len(data), sha) != (e["bytes"], e["sha256"]) or e.get("sq_sums", sq) != sq:  # e.g. GPU non-determinism
            e["bytes"], e["sha256"] = len(data), sha
            if "sq_sums" in e:  # an older shard without the field stays without it (its store has none)
                e["sq_sums"] = sq
            self._write_manifest()

    def _prepare(self, blocks: Mapping[str, torch.Tensor], row0: int) -> tuple[dict[str, torch.Tensor], int]:
        """Validate one append's blocks and convert them to the storage dtype on the CPU: (tensors, rows)."""
        if set(blocks) != set(self._dims):
            raise ValueError(f"append: blocks {sorted(blocks)} do not match the store's {sorted(self._dims)}")
        dtype = _dtype(self.manifest["dtype"], "the store's dtype")
        n_new = None
        tensors = {}
        for name in self._dims:
            t = blocks[name]
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError(f"append: block {name!r} must be a floating tensor")
            if t.dim() != 2 or t.shape[1] != self._dims[name]:
                raise ValueError(f"append: block {name!r} must be (N, {self._dims[name]}), got {tuple(t.shape)}")
            if n_new is None:
                n_new = t.shape[0]
            elif t.shape[0] != n_new:
                raise ValueError("append: blocks have different numbers of examples")
            bad = _bad_row(t)
            if bad is not None:
                raise ValueError(f"block {name!r}: non-finite gradient for example {row0 + bad} of the capture")
            c = t.detach().to(device="cpu", dtype=dtype).contiguous()
            if c.dtype != t.dtype:
                bad = _bad_row(c)
                if bad is not None:
                    raise ValueError(
                        f"block {name!r}: example {row0 + bad} of the capture overflows the storage dtype {dtype} "
                        "(store in bfloat16 or float32 instead)"
                    )
            tensors[name] = c
        return tensors, int(n_new or 0)

    def _serialise(self, pieces: Mapping[str, list[torch.Tensor]], idx: int) -> bytearray:
        """One shard's safetensors bytes from each block's row pieces (CPU, contiguous, storage dtype),
        written straight into one buffer (no concatenated copy of the rows). The header holds one
        metadata key (the format, the shard's index and the capture's fingerprint id, so a shard copied
        in from another store is recognised); tensors are laid out in name order: deterministic bytes."""
        meta = {"format": f"{FORMAT}/{idx}/{_fingerprint_id(self.manifest.get('fingerprint') or {})}"}
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

    def _write_manifest(self) -> None:
        self.manifest["format_version"] = max(int(self.manifest.get("format_version", 1)), FORMAT_VERSION)
        atomic_write(self.path / self._mname, json.dumps(self.manifest, indent=1).encode(), durable=True)

    def mark_complete(self) -> None:
        """Write any buffered rows (:meth:`flush`) and record that the capture finished (:meth:`open`
        then reads the store without ``allow_incomplete``).

        Raises:
            StoreError: the last shard could not be written (see :meth:`flush`).
        """
        self.flush()
        if not self.manifest.get("complete"):
            self.manifest["complete"] = True
            self._write_manifest()

    @property
    def n_stored(self) -> int:
        """Rows in the shards written so far (not counting buffered rows)."""
        return int(self.manifest["n"])

    def fill(self, collector: Any, dataloader: Iterable, *, progress: bool = True) -> GradientStore:
        """Capture every batch of ``dataloader`` not yet stored (resume), buffering batches into shards
        of ``shard_bytes``.

        Every batch is first checked against the shard that already holds it (its
        :func:`batch_digest` and row count: no forward pass), so a re-run resumes an interrupted
        capture from the first batch not in a complete shard, reuses a complete store of the same
        data without recomputing anything, and refuses other data. A stored shard whose file is
        missing, truncated, corrupted or foreign is recomputed from its batches and rewritten
        atomically, with a warning (logger ``"fastinf"``) naming it. Returns the complete store,
        opened for reading.

        Inside an initialised ``torch.distributed`` process group (more than one process), call it on
        every rank with the same dataloader: rank r captures the r-th contiguous range of the batches
        not yet stored (:func:`fastinf.distributed.split_range`) into its own shards
        (``shard-r{r}of{P}-*.safetensors``, recorded in ``part-r{r}of{P}.json``); after all ranks
        finish, rank 0 checks the shards already stored and merges the ranks' records, in batch
        order, into the manifest (one atomic write), so the store equals a one-process capture (same
        rows in the same order, the same bytes per row). A rank killed mid-capture loses only its
        buffered batches: re-running every rank resumes each part. The dataloader must have a
        ``len()`` or be re-iterable (it is then counted first).

        Raises:
            StoreError: the data differs from what the store holds: a batch with other content or
                rows than its shard ("shard 3 holds other data than batch 7"), fewer or more rows in
                all ("the store holds 20 rows, the data 5"), or a shard that recorded no data digest;
                each message ends in "pass overwrite=True" (recompute the store from scratch). A shard
                could not be written (``OSError``: see :meth:`flush`). Distributed: any rank's error,
                on every rank.
            ValueError: the dataloader yielded no batches.
        """
        if distributed.is_distributed():
            return self._fill_distributed(collector, dataloader, progress=progress)
        from tqdm.auto import tqdm

        total = len(dataloader) if hasattr(dataloader, "__len__") else None
        bar = tqdm(
            dataloader,
            total=total,
            desc=f"per-example gradients -> {self.path.name}",
            unit="batch",
            disable=not progress,
        )
        f = _Filler(self, collector)
        for i, batch in enumerate(bar):
            f.step(i, i, batch)
        f.finish()
        self.mark_complete()
        return GradientStore.open(self.path)

    # ------------------------------------------------------------------------------ distributed capture
    def _part(self, r: int, p: int, b0: int, b1: int) -> GradientStore:
        """Rank ``r``'s part of a distributed capture of batches ``[b0, b1)``: reopened to resume when a
        part of the same capture and range exists, else (a stale part is discarded) started empty."""
        name, prefix = f"part-r{r}of{p}.json", f"shard-r{r}of{p}-"
        want = {"rank": r, "world_size": p, "first_batch": b0, "stop_batch": b1}
        man = None
        if (self.path / name).exists():
            try:
                man = self._read_manifest(self.path, name)
            except StoreError as e:
                log.warning("%s: discarding an unreadable part record (%s)", self.path / name, e)
            if man is not None and (man.get("fingerprint") != self.manifest["fingerprint"] or man.get("part") != want):
                log.warning(
                    "%s: discarding the part of an earlier capture (another range of batches or arguments)",
                    self.path / name,
                )
                for e in man.get("shards", []):
                    (self.path / e["file"]).unlink(missing_ok=True)
                man = None
        if man is None:
            man = _new_manifest(self.manifest["fingerprint"], self.shard_bytes)
            man["dtype"] = self.manifest["dtype"]
            man["part"] = want
            atomic_write(self.path / name, json.dumps(man, indent=1).encode(), durable=True)
        return GradientStore(self.path, man, shard_bytes=self.shard_bytes, manifest_name=name, shard_prefix=prefix)

    def _fill_distributed(self, collector: Any, dataloader: Iterable, *, progress: bool) -> GradientStore:
        from tqdm.auto import tqdm

        r, p = distributed.rank(), distributed.world_size()
        if hasattr(dataloader, "__len__"):
            total = len(dataloader)
        elif iter(dataloader) is dataloader:
            raise TypeError(
                "a distributed capture needs a dataloader with len() or one that can be iterated twice "
                "(every rank must know the number of batches to take its share)"
            )
        else:
            total = sum(1 for _ in dataloader)
        complete = bool(self.manifest.get("complete"))
        err: BaseException | None = None
        payload = None
        try:
            if complete:  # a finished store: rank 0 checks it against the data (and repairs), the others wait
                if r == 0:
                    f = _Filler(self, collector)
                    for i, batch in enumerate(dataloader):
                        f.step(i, i, batch)
                    f.finish()
            else:
                s = sum(len(_entry_batches(e)) for e in self.manifest["shards"])  # stored by a one-process run
                b0, b1 = distributed.split_range(max(total - s, 0), r, p)
                b0, b1 = b0 + s, b1 + s
                part = self._part(r, p, b0, b1) if b1 > b0 else None
                f0 = _Filler(self, collector) if r == 0 and s else None
                fp = _Filler(part, collector) if part is not None else None
                bar = tqdm(
                    dataloader,
                    total=total,
                    desc=f"per-example gradients -> {self.path.name} (rank {r}/{p})",
                    unit="batch",
                    disable=not progress or r != 0,
                )
                for i, batch in enumerate(bar):
                    if i >= b1:  # b1 >= s: nothing of this rank's after it
                        break
                    if i < s:
                        if f0 is not None:
                            f0.step(i, i, batch)
                    elif i >= b0:
                        fp.step(i - b0, i, batch)
                if f0 is not None:
                    f0.finish()
                if fp is not None:
                    fp.finish()
                    part.flush()
                    payload = (b0, b1, part.manifest["shards"])
                elif total == 0 and s == 0 and r == 0:
                    raise ValueError("the dataloader yielded no batches: nothing to capture")
        except Exception as e:
            err = e
        results = distributed.all_gather_objects(None if err is None else f"rank {r}: {type(err).__name__}: {err}")
        if err is not None:
            raise err
        failed = [m for m in results if m is not None]
        if failed:
            raise StoreError(f"{self.path}: the distributed capture failed on {failed[0]}")
        parts = distributed.all_gather_objects(payload)
        if not complete and r == 0:
            self._merge_parts([q for q in parts if q is not None], total)
        elif complete and r == 0:
            self._remove_parts()
        distributed.barrier()
        return GradientStore.open(self.path)

    def _merge_parts(self, parts: list, total: int) -> None:
        """Rank 0: append the ranks' shard records (in batch order) to the manifest, mark it complete
        (one atomic write), then remove the part records."""
        shards = self.manifest["shards"]
        at = sum(len(_entry_batches(e)) for e in shards)
        for b0, b1, entries in sorted(parts, key=lambda q: q[0]):
            got = sum(len(_entry_batches(e)) for e in entries)
            if b0 != at or got != b1 - b0:  # pragma: no cover - the ranks' ranges tile the batches by construction
                raise StoreError(f"{self.path}: the ranks' parts do not tile the batches (at {at}: part {b0}..{b1})")
            shards.extend(entries)
            self.manifest["n"] += sum(e["n"] for e in entries)
            at = b1
        if at != total:  # pragma: no cover
            raise StoreError(f"{self.path}: the ranks' parts cover {at} of {total} batches")
        self.manifest["complete"] = True
        self._write_manifest()
        self._remove_parts()

    def _remove_parts(self) -> None:
        """Remove part records and rank shards no longer listed in the manifest (a finished store)."""
        listed = {e["file"] for e in self.manifest["shards"]}
        for q in self.path.glob("part-r*of*.json"):
            q.unlink(missing_ok=True)
        for q in self.path.glob("shard-r*of*-*.safetensors"):
            if q.name not in listed:
                q.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------ reading
    def _shard_path(self, entry: dict) -> Path:
        return self.path / entry["file"]

    def _shard_problem(self, entry: dict) -> str | None:
        """Why a shard's file does not match its manifest entry (missing, size, SHA-256, written by
        another store), or None."""
        p = self._shard_path(entry)
        if not p.exists():
            return "shard listed in the manifest is missing"
        size = p.stat().st_size
        if size != entry["bytes"] or _sha256(p) != entry["sha256"]:
            foreign = self._foreign(p)
            if foreign is not None:
                return foreign
            if size != entry["bytes"]:
                return f"shard is truncated or was modified ({size} bytes, manifest says {entry['bytes']})"
            return "shard checksum mismatch (the file is corrupted)"
        return None

    def _foreign(self, p: Path) -> str | None:
        """A description when the (readable) shard file ``p`` was written by a store of another capture."""
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception:  # unreadable: not foreign, damaged
            return None
        own = _fingerprint_id(self.manifest.get("fingerprint") or {})
        fmt = str(meta.get("format", "")).split("/")
        other = fmt[2] if len(fmt) == 3 and fmt[0] == FORMAT else None
        if other is not None and other != own:
            return (
                f"foreign shard: written by a store of another capture (fingerprint {other} vs this store's {own}), "
                "not the shard the manifest lists"
            )
        return None

    def _check_shard(self, entry: dict) -> Path:
        p = self._shard_path(entry)
        if entry["file"] in self._verified:
            return p
        if not self._checksums:
            if not p.exists():
                raise StoreError(f"{p}: shard listed in the manifest is missing")
            size = p.stat().st_size
            if size != entry["bytes"]:
                problem = (
                    self._foreign(p)
                    or f"shard is truncated or was modified ({size} bytes, manifest says {entry['bytes']})"
                )
                raise StoreError(f"{p}: {problem}")
            return p  # not marked verified: verify() still hashes it
        problem = self._shard_problem(entry)
        if problem is not None:
            raise StoreError(f"{p}: {problem}")
        self._verified.add(entry["file"])
        return p

    def verify(self) -> None:
        """Check every shard's size and SHA-256 (also when opened with ``checksums=False``).

        Raises:
            StoreError: a shard is missing, truncated, corrupted or foreign (names the shard).
        """
        for e in self.manifest["shards"]:
            if e["file"] not in self._verified:
                problem = self._shard_problem(e)
                if problem is not None:
                    raise StoreError(f"{self._shard_path(e)}: {problem}")
                self._verified.add(e["file"])

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

    def block_sq_sums(self) -> dict[str, float] | None:
        """Σ_i ‖g_il‖² per block over all rows of this store, as stored (float64, from the ``sq_sums`` its
        shards record when written), or None when it cannot tell: a shard without the field (a store
        written before it), a view that does not cover every stored row, or a ``.to(dtype=...)`` view
        into a dtype that does not hold the stored values exactly. Reads no rows."""
        shards = self.manifest["shards"]
        if not shards or any(not isinstance(e.get("sq_sums"), Mapping) for e in shards):
            return None
        if sum(int(e["n"]) for e in shards) != self.n:  # a view of some rows only
            return None
        stored = _dtype(self.manifest["dtype"], "the store's dtype")
        view = self._view[0]
        if view is not None and torch.promote_types(stored, view) != view:  # narrowing view: other values
            return None
        try:
            return {k: math.fsum(float(e["sq_sums"][k]) for e in shards) for k in self._dims}
        except (KeyError, TypeError, ValueError):  # a malformed entry: as if absent
            return None

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
        view = GradientStore(self.path, self.manifest, dtype=dtype or self._view[0], device=device or self._view[1])
        view._verified, view._checksums = self._verified, self._checksums  # shards checked once for all views
        return view

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


def _entry_batches(e: Mapping) -> list[dict]:
    """The batches a shard holds, [{n, data_sha256}] (format 2 shards held one batch each)."""
    b = e.get("batches")
    if b is not None:
        return b
    return [{"n": e["n"], "data_sha256": e.get("data_sha256")}]


def _os_message(e: OSError) -> str:
    return f"[Errno {e.errno}] {e.strerror}" if e.errno is not None and e.strerror else f"{type(e).__name__}: {e}"


class _Filler:
    """One pass of a capture over a store (or a rank's part): checks each batch against the batch its
    shards record (digest, rows), recomputes damaged shards from their batches, captures the rest."""

    def __init__(self, store: GradientStore, collector: Any) -> None:
        self.st, self.col = store, collector
        self.recs: list[tuple[int, int, int, int, str | None]] = []  # (shard, position, batches in it, rows, digest)
        for si, e in enumerate(store.manifest["shards"]):
            bl = _entry_batches(e)
            self.recs += [(si, pos, len(bl), int(b["n"]), b.get("data_sha256")) for pos, b in enumerate(bl)]
        self.stored, self.complete = len(self.recs), bool(store.manifest.get("complete"))
        self.rows = self.batches = 0
        self.mismatch: str | None = None  # the first difference; after it, batches are only counted
        self.rows_known = True  # False once a batch's rows could not be told (a batch without tensors)
        self.problems: dict[int, str | None] = {}
        self.repair: dict[int, list[dict[str, torch.Tensor]]] = {}
        self.repaired: list[str] = []

    def _label(self, si: int) -> str:
        main = self.st._mname == MANIFEST
        return f"shard {si}" if main else f"shard {self.st.manifest['shards'][si]['file']}"

    def step(self, j: int, i: int, batch: Any) -> None:
        """Batch ``i`` of the data, the ``j``-th of this store (or part)."""
        self.batches = j + 1
        size = _batch_size(batch, strict=False)
        st = self.st
        if self.mismatch is None and j >= self.stored and not self.complete:  # not stored yet: capture it
            digest = batch_digest(batch)
            grads = self.col.batch_gradients(batch)
            st.append(grads, data_sha256=digest)
            self.rows += next(iter(grads.values())).shape[0]
            return
        if self.mismatch is None and j < self.stored:
            si, pos, nb, n, d = self.recs[j]
            if d is None:
                raise StoreError(
                    f"{st.path}: {self._label(si)} records no digest of its data (written by an older fastinf or "
                    "by append() without data_sha256), so it cannot be checked against the data; "
                    "pass overwrite=True to recompute the store"
                )
            if size is not None and n != size:
                self.mismatch = (
                    f"{self._label(si)} holds other data than batch {i} ({n} rows vs {size}: other data, or the "
                    "same data in batches of another size)"
                )
            elif d != batch_digest(batch):
                self.mismatch = f"{self._label(si)} holds other data than batch {i} (same {n} rows, other content)"
            else:
                self.rows += n
                if si not in self.problems:
                    self.problems[si] = st._shard_problem(st.manifest["shards"][si])
                if self.problems[si] is not None:
                    self.repair.setdefault(si, []).append(self.col.batch_gradients(batch))
                    if pos == nb - 1:
                        parts = self.repair.pop(si)
                        blocks = {k: torch.cat([g[k] for g in parts]) for k in parts[0]}
                        st._rewrite_shard(si, blocks)
                        e = st.manifest["shards"][si]
                        self.repaired.append(e["file"])
                        log.warning(
                            "%s: %s; recomputed it from batch%s %s",
                            st._shard_path(e),
                            self.problems[si],
                            "es" if nb > 1 else "",
                            f"{i - nb + 1}..{i}" if nb > 1 else i,
                        )
                return
        elif self.mismatch is None:  # a complete store, and the data goes on
            self.mismatch = f"the store holds {self.stored} batches, the data more"
        # after the first difference the remaining batches are only counted, for the message
        if size is None:
            self.rows_known = False
        else:
            self.rows += size

    def finish(self) -> None:
        """Raise if the data differed from the store (see :meth:`GradientStore.fill`)."""
        st = self.st
        if self.batches == 0 and self.stored == 0:
            raise ValueError("the dataloader yielded no batches: nothing to capture")
        if self.mismatch is not None or self.batches < self.stored:
            if self.rows_known and self.rows != st.n_stored and (self.complete or self.rows < st.n_stored):
                what = f"the store holds {st.n_stored} rows, the data {self.rows}"
            else:
                what = self.mismatch or f"the store holds {self.stored} batches, the data {self.batches}"
            state = "" if self.complete else " (an unfinished capture)"
            raise StoreError(
                f"{st.path}{state}: {what}; pass overwrite=True to recompute the store from this data, "
                "or use another directory"
            )
        if len(self.repaired) > 1:
            log.warning("%s: rewrote %d damaged shard(s): %s", st.path, len(self.repaired), ", ".join(self.repaired))


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
