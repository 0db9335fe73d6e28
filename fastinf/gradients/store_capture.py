"""Filling a :class:`~fastinf.gradients.store.GradientStore` from a dataloader: resume, data checks,
repair of damaged shards, and distributed capture.

Every batch is checked against the shard that claims it (rows and :func:`~.store_format.batch_digest`,
no forward pass) before anything is computed, so a re-run resumes, reuses identical data, refuses
other data, and recomputes exactly the damaged shards (:class:`_Filler`).

Distributed capture (inside an initialised ``torch.distributed`` process group,
``collector.collect(loader, store=path)`` on every rank): rank r captures the r-th contiguous range of
the batches (:func:`fastinf.distributed.split_range`) into its own shards and part record; after all
ranks finish, rank 0 appends the parts' shard entries in batch order to ``manifest.json`` (one atomic
write), so the finished store equals a one-process capture: same examples in the same order, each row
the same bytes (only the shard boundaries differ). A killed rank's part resumes when every rank is
re-run with the same world size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import torch

from ..distributed import all_gather_objects, barrier, broadcast_object, is_distributed, rank, split_range, world_size
from . import factors as kf
from .store_format import (
    MANIFEST,
    StoreError,
    _batch_size,
    _entry_batches,
    _model_differences,
    _new_manifest,
    batch_digest,
)

log = logging.getLogger("fastinf")


class _CaptureMixin:
    """The capture side of :class:`~fastinf.gradients.store.GradientStore` (mixed into it)."""

    __slots__ = ()

    @classmethod
    def _create_for_capture(
        cls,
        path: str | os.PathLike,
        collector: Any,
        *,
        overwrite: bool = False,
        store_dtype: torch.dtype | str | None = None,
        shard_bytes: int | None = None,
    ) -> Any:
        """:meth:`create` on every rank of a process group: the ranks' fingerprints must agree; rank 0
        creates (or wipes, or checks) the directory, the others then reopen it. One process: create."""
        if not is_distributed():
            return cls.create(path, collector, overwrite=overwrite, store_dtype=store_dtype, shard_bytes=shard_bytes)
        fp = collector.fingerprint() if hasattr(collector, "fingerprint") else collector
        fps = all_gather_objects(fp)
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
        if rank() == 0:
            try:
                cls.create(path, fp, overwrite=overwrite, store_dtype=store_dtype, shard_bytes=shard_bytes)
            except Exception as e:  # every rank raises the same error
                err = e
        msg = broadcast_object(None if err is None else (type(err).__name__, str(err)))
        if err is not None:
            raise err
        if msg is not None:
            raise (TypeError if msg[0] == "TypeError" else ValueError if msg[0] == "ValueError" else StoreError)(msg[1])
        return cls.create(path, fp, store_dtype=store_dtype, shard_bytes=shard_bytes)

    def fill(self, collector: Any, dataloader: Iterable, *, progress: bool = True) -> Any:
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
        if is_distributed():
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
        return type(self).open(self.path)

    # ------------------------------------------------------------------------------ distributed capture
    def _part(self, r: int, p: int, b0: int, b1: int) -> Any:
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
            part = type(self)(self.path, man, shard_bytes=self.shard_bytes, manifest_name=name, shard_prefix=prefix)
            part._write_manifest()  # the store's one (durable, atomic) manifest writer
            return part
        return type(self)(self.path, man, shard_bytes=self.shard_bytes, manifest_name=name, shard_prefix=prefix)

    def _fill_distributed(self, collector: Any, dataloader: Iterable, *, progress: bool) -> Any:
        from tqdm.auto import tqdm

        r, p = rank(), world_size()
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
                b0, b1 = split_range(max(total - s, 0), r, p)
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
        results = all_gather_objects(None if err is None else f"rank {r}: {type(err).__name__}: {err}")
        if err is not None:
            raise err
        failed = [m for m in results if m is not None]
        if failed:
            raise StoreError(f"{self.path}: the distributed capture failed on {failed[0]}")
        parts = all_gather_objects(payload)
        if not complete and r == 0:
            self._merge_parts([q for q in parts if q is not None], total)
        elif complete and r == 0:
            self._remove_parts()
        barrier()
        return type(self).open(self.path)

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


class _Filler:
    """One pass of a capture over a store (or a rank's part): checks each batch against the batch its
    shards record (digest, rows), recomputes damaged shards from their batches, captures the rest."""

    def __init__(self, store: Any, collector: Any) -> None:
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

    def _compute(self, batch: Any) -> tuple[dict[str, torch.Tensor], Any]:
        """(gradients, Kronecker-factor sums or None) of one batch: factors when the store records them."""
        if self.st.has_factors:
            return self.col.batch_gradients(batch, factors=True)
        return self.col.batch_gradients(batch), None

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
            grads, sums = self._compute(batch)
            st.append(grads, data_sha256=digest, factors=sums)
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
                    self.repair.setdefault(si, []).append(self._compute(batch))
                    if pos == nb - 1:
                        parts = self.repair.pop(si)
                        blocks = {k: torch.cat([g[k] for g, _ in parts]) for k in parts[0][0]}
                        st._rewrite_shard(si, blocks, kf.total(f for _, f in parts))
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
