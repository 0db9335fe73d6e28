"""``GradientStore``: an on-disk GradientSet — a directory of safetensors shards + a JSON manifest.

The on-disk layout (manifest fields, shard files, rank parts) is documented in :mod:`.store_format`.

Writes are atomic: a shard is written to a temporary file, fsynced and renamed; then the manifest is
rewritten the same way (once per shard, never per append). A capture killed at any point loses at most
the buffered batches and leaves at most an orphan temporary file or an unlisted shard, both ignored
and overwritten on resume, which recomputes from the first batch not in a complete shard; shard
boundaries depend only on the batches and ``shard_bytes``, so the resumed store is bit-identical to an
uninterrupted run. An ``OSError`` while writing (a full disk) raises a :class:`StoreError` naming the
shard and the OS error; the manifest still lists only complete shards, and a re-run resumes. No
pickle anywhere.

Capture (resume, data checks, repair, distributed capture) lives in :mod:`.store_capture`; the
format helpers (fingerprints, digests, dtypes, manifests) in :mod:`.store_format`.

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
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import os
import shutil
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..utils import atomic_write
from . import factors as kf
from .gradient_set import GradientSet, chunk_range
from .store_capture import _CaptureMixin
from .store_format import (
    DEFAULT_SHARD_BYTES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    StoreError,
    _bad_row,
    _dtype,
    _dtype_name,
    _fingerprint_id,
    _new_manifest,
    _os_message,
    _sha256,
    _sq_sum,
    batch_digest,
    check_same_model,
    serialise_shard,
)

__all__ = ["GradientStore", "StoreError", "batch_digest", "check_same_model"]

log = logging.getLogger("fastinf")


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


class GradientStore(_CaptureMixin, GradientSet):
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
        self._factors = None  # the summed factors, read from the shards on first use

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
    def append(self, blocks: Mapping[str, torch.Tensor], *, data_sha256: str | None = None, factors=None) -> None:
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
        ``factors``: the batch's Kronecker-factor sums (``collector.batch_gradients(batch,
        factors=True)[1]``), required exactly when the store records factors; each shard stores their sum.

        Raises:
            ValueError: blocks that do not match the store's names or widths, ragged row counts,
                non-finite values (also after conversion: float16 overflows beyond 65504).
            StoreError: the shard this append completes could not be written (an ``OSError``, e.g. a
                full disk: the message names the shard and the OS error); the store on disk is
                unchanged and the rows stay buffered (:meth:`flush` retries).
        """
        row0 = self.n_stored + sum(b[1] for b in self._buf)
        tensors, n_new = self._prepare(blocks, row0)
        if (factors is None) == self.has_factors:
            raise ValueError(
                "append: this store records Kronecker factors: pass factors="
                if self.has_factors
                else "append: factors= given, but this store was not created for a capture with factors=True"
            )
        self._buf.append((tensors, n_new, data_sha256, factors))
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
        sums = kf.total(b[3] for b in self._buf)
        data = self._serialise({k: [b[0][k] for b in self._buf] for k in self._dims}, idx, sums)  # no concat copy
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
            "batches": [{"n": n, "data_sha256": d} for _, n, d, _ in self._buf],
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
        self._factors = None  # a new shard's sums and rows change the summed, normalised factors

    def _rewrite_shard(self, idx: int, blocks: Mapping[str, torch.Tensor], sums: Any = None) -> None:
        """Recompute shard ``idx`` in place (atomically) from freshly computed ``blocks`` (and factor sums)."""
        e = self.manifest["shards"][idx]
        row0 = sum(s["n"] for s in self.manifest["shards"][:idx])
        tensors, n_new = self._prepare(blocks, row0)
        if n_new != e["n"]:  # pragma: no cover - fill() checked the batches' rows against the shard's
            raise StoreError(f"{self.path}: recomputed {n_new} rows for shard {idx}, which holds {e['n']}")
        data = self._serialise({k: [t] for k, t in tensors.items()}, idx, sums)
        self._factors = None
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

    def _serialise(self, pieces: Mapping[str, list[torch.Tensor]], idx: int, sums: Any = None) -> bytearray:
        """One shard's bytes (:func:`~.store_format.serialise_shard`), with its factor sums, if any."""
        extra = None if sums is None else kf.sums_to_tensors(sums)
        return serialise_shard(pieces, idx, self.manifest.get("fingerprint") or {}, extra)

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

    @property
    def has_factors(self) -> bool:
        """Whether the capture recorded Kronecker factors (``collect(..., factors=True)``)."""
        return bool((self.manifest.get("fingerprint") or {}).get("factors"))

    @property
    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """Kronecker factors block -> (A, S) over all stored rows (METHODS.md §11; float64), the sum of
        the shards' factor sums (read once, checked like the rows), or None without factors."""
        if not self.has_factors or not self.manifest["shards"]:
            return None
        if self._factors is None:
            paths = [self._check_shard(e) for e in self.manifest["shards"]]
            self._factors = kf.normalise(kf.total(kf.read_shard_sums(p, self._dims, StoreError) for p in paths), self.n)
        return dict(self._factors)

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
