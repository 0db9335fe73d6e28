"""``GradientStore``: an on-disk GradientSet — a directory of safetensors shards + a JSON manifest.

Layout::

    store/
      manifest.json           format, fastinf version, capture fingerprint (model class, adapter
                              config, block names and dims, dtype, projection and seed), n, and one
                              entry per shard {file, n, bytes, sha256}
      shard-00000.safetensors one tensor per block, (n_shard, d_l)
      ...

Writes are atomic: a shard is written to a temporary file, fsynced and renamed; then the manifest is
rewritten the same way. A capture killed at any point leaves at most an orphan temporary file or an
unlisted shard, both ignored and overwritten on resume, so resuming yields a store bit-identical to
an uninterrupted run. A store whose fingerprint differs from the capture's refuses to mix unless
``overwrite=True``. No pickle anywhere.

``GradientStore.open(path)`` is a :class:`GradientSet` whose blocks are read lazily from the shards
(one block at a time, kept in a small cache), so estimators that work block by block never hold
more than one block of the training gradients in memory. Every shard's size and SHA-256 are checked
on first read; a truncated or corrupted shard raises an error naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..utils import atomic_write
from ..version import __version__
from .gradient_set import GradientSet, _first_bad_example

__all__ = ["GradientStore", "StoreError"]

FORMAT = "fastinf-gradient-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class StoreError(ValueError):
    """A gradient store that is missing, corrupted, truncated or incompatible."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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

    __slots__ = ("path", "manifest", "_dims", "_verified", "_view")

    def __init__(self, path: str | os.PathLike, manifest: dict, *, dtype=None, device=None) -> None:
        # no GradientSet.__init__: blocks are lazy
        self.path = Path(path)
        self.manifest = manifest
        self._dims: dict[str, int] = dict(manifest["blocks"])
        self._verified: set[str] = set()
        self._view = (dtype, device)
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
        is reopened for resuming; a different one raises unless ``overwrite=True`` (then it is wiped).
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
        """Open an existing store for reading (lazily)."""
        path = Path(path)
        manifest = cls._read_manifest(path)
        if not manifest["shards"]:
            raise StoreError(f"{path}: the store holds no examples yet")
        if not manifest.get("complete", False):
            msg = (
                f"{path}: the capture did not finish ({manifest['n']} examples stored); resume it to complete the store"
            )
            if not allow_incomplete:
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
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
    def append(self, blocks: Mapping[str, torch.Tensor]) -> None:
        """Append one shard (atomically): name -> (N, d_l) for every block of the store."""
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
                raise ValueError(
                    f"block {name!r}: non-finite gradient for example {self.n_stored + bad} of the capture"
                )
            tensors[name] = t.detach().to(device="cpu", dtype=dtype).contiguous()
        idx = len(self.manifest["shards"])
        fname = f"shard-{idx:05d}.safetensors"
        data = save(tensors, metadata={"format": f"{FORMAT}/{idx}"})  # one key: deterministic header
        atomic_write(self.path / fname, data, durable=True)
        entry = {"file": fname, "n": int(n_new), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        self.manifest["shards"].append(entry)
        self.manifest["n"] += int(n_new)
        self._write_manifest()

    def _write_manifest(self) -> None:
        atomic_write(self.path / MANIFEST, json.dumps(self.manifest, indent=1).encode(), durable=True)

    def mark_complete(self) -> None:
        self.manifest["complete"] = True
        self._write_manifest()

    @property
    def n_stored(self) -> int:
        return int(self.manifest["n"])

    def fill(self, collector: Any, dataloader: Iterable, *, progress: bool = True) -> GradientStore:
        """Capture every batch of ``dataloader`` not yet stored (resume), one shard per batch."""
        from tqdm.auto import tqdm

        if self.manifest.get("complete"):
            return GradientStore.open(self.path)
        done = self.n_stored
        seen = 0
        total = len(dataloader) if hasattr(dataloader, "__len__") else None
        bar = tqdm(
            dataloader,
            total=total,
            desc=f"per-example gradients -> {self.path.name}",
            unit="batch",
            disable=not progress,
        )
        for batch in bar:
            if seen < done:
                size = _batch_size(batch)
                if seen + size > done:
                    raise StoreError(
                        f"{self.path}: the dataloader's batches do not line up with the stored shards "
                        f"({done} examples stored, a batch spans {seen}..{seen + size}); resume with the same loader"
                    )
                seen += size
                continue
            grads = collector.batch_gradients(batch)
            self.append(grads)
            seen += next(iter(grads.values())).shape[0]
        if self.n_stored == 0:
            raise ValueError("the dataloader yielded no batches: nothing to capture")
        self.mark_complete()
        return GradientStore.open(self.path)

    # ------------------------------------------------------------------------------ reading
    def _shard_path(self, entry: dict) -> Path:
        return self.path / entry["file"]

    def _check_shard(self, entry: dict) -> Path:
        p = self._shard_path(entry)
        if entry["file"] in self._verified:
            return p
        if not p.exists():
            raise StoreError(f"{p}: shard listed in the manifest is missing")
        size = p.stat().st_size
        if size != entry["bytes"]:
            raise StoreError(f"{p}: shard is truncated or was modified ({size} bytes, manifest says {entry['bytes']})")
        if _sha256(p) != entry["sha256"]:
            raise StoreError(f"{p}: shard checksum mismatch (the file is corrupted)")
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

    def _rows(self, start: int, stop: int) -> GradientSet:
        from safetensors import safe_open

        out: dict[str, list[torch.Tensor]] = {k: [] for k in self._dims}
        off = 0
        for e in self.manifest["shards"]:
            s0, s1 = off, off + e["n"]
            off = s1
            if s1 <= start or s0 >= stop:
                continue
            p = self._check_shard(e)
            a, b = max(start, s0) - s0, min(stop, s1) - s0
            with safe_open(str(p), framework="pt") as f:
                for k in self._dims:
                    out[k].append(f.get_slice(k)[a:b])
        dtype, device = self._view
        return GradientSet({k: torch.cat(v).to(device=device, dtype=dtype) for k, v in out.items()}, validate=False)

    def iter_chunks(self, size: int):
        """Yield (start, GradientSet of rows start..start+size) over the whole store."""
        for s in range(0, self.n, size):
            yield s, self._rows(s, min(s + size, self.n))

    def load(self) -> GradientSet:
        """The whole store in memory."""
        return self._rows(0, self.n)


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Mapping):
        for v in batch.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return int(v.shape[0])
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return int(batch[0].shape[0])
    raise ValueError("cannot tell the batch size of a batch without tensors")
