"""``GradientSet``: per-example gradients stored as named blocks.

A block is one parameter tensor (METHODS.md §0): ``lora_A`` (r × d_in) and ``lora_B`` (d_out × r)
are separate blocks. Each block is held as an ``(n, d_l)`` tensor whose row ``i`` is example ``i``'s
gradient of that parameter flattened row-major.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from .factors import check_factors

__all__ = ["GradientSet"]

IndexLike = slice | int | Sequence[int] | torch.Tensor


def chunk_range(n: int, size: int, start: int = 0, stop: int | None = None) -> tuple[int, int]:
    """Check ``iter_chunks`` arguments against ``n`` rows: ``(start, stop)`` with ``stop`` defaulting to n.

    Raises:
        ValueError: ``size`` < 1, or not ``0 <= start <= stop <= n``.
    """
    stop = n if stop is None else stop
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"iter_chunks: size must be a positive int, got {size!r}")
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= n):
        raise ValueError(f"iter_chunks: need 0 <= start <= stop <= n = {n}, got start={start!r}, stop={stop!r}")
    return start, stop


def _first_bad_example(x: torch.Tensor) -> int | None:
    """Index of the first example (row) containing NaN or ±inf, or None if all finite."""
    if x.numel() == 0:
        return None
    bad = ~torch.isfinite(x).reshape(x.shape[0], -1).all(dim=1)
    if bool(bad.any()):
        return int(torch.nonzero(bad)[0, 0])
    return None


class GradientSet:
    """Per-example gradients as named blocks, each an ``(n, d_l)`` tensor with the same ``n``.

    Args:
        blocks: mapping from block name (a parameter name) to a tensor of shape ``(n, d_l)``.
            Tensors with more than two dimensions ``(n, *shape)`` are flattened row-major to
            ``(n, prod(shape))``. Block order is the mapping's order.
        validate: check finiteness of every entry (one pass over the data). Shape and dtype are
            always checked.
        factors: optional Kronecker factors of the blocks (METHODS.md §11), block name -> (A, S) with
            A (d_in × d_in), S (d_out × d_out) and d_in·d_out = d_l, kept as float64 CPU tensors
            (:attr:`factors`); ``LoRAGradientCollector.collect(..., factors=True)`` sets them. They
            describe the whole set: :meth:`to` and :meth:`select` keep them, row selections
            (:meth:`subset`, :meth:`iter_chunks`, :meth:`mean`) drop them.

    Raises:
        TypeError: a block is not a tensor or not of a floating dtype.
        ValueError: no blocks, a block with fewer than 2 dimensions, unequal ``n`` across blocks,
            ``n == 0`` or a zero-width block, or a NaN/inf entry (names the block and the first bad
            example); factors of an unknown block or of sizes that do not match its width.
    """

    __slots__ = ("_blocks", "_factors")

    def __init__(
        self,
        blocks: Mapping[str, torch.Tensor],
        *,
        validate: bool = True,
        factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        if not isinstance(blocks, Mapping):
            raise TypeError(f"GradientSet expects a mapping name -> tensor, got {type(blocks).__name__}")
        if len(blocks) == 0:
            raise ValueError("GradientSet needs at least one block; got an empty mapping")
        out: dict[str, torch.Tensor] = {}
        n: int | None = None
        first = None
        device = None
        for name, x in blocks.items():
            if not isinstance(name, str):
                raise TypeError(f"block names must be str, got {name!r}")
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"block {name!r}: expected a torch.Tensor, got {type(x).__name__}")
            if not x.is_floating_point():
                raise TypeError(f"block {name!r}: expected a floating dtype, got {x.dtype}")
            if x.dim() < 2:
                raise ValueError(f"block {name!r}: expected shape (n, d) or (n, *shape), got {tuple(x.shape)}")
            if x.dim() > 2:
                x = x.reshape(x.shape[0], -1)
            if n is None:
                n, first, device = x.shape[0], name, x.device
            elif x.shape[0] != n:
                raise ValueError(f"block {name!r} has {x.shape[0]} examples but block {first!r} has {n}")
            if x.device != device:
                raise ValueError(f"block {name!r} is on {x.device} but block {first!r} is on {device}")
            if x.shape[1] == 0:
                raise ValueError(f"block {name!r} has zero width")
            out[name] = x
        if n == 0:
            raise ValueError("GradientSet is empty (n = 0 examples)")
        if validate:
            for name, x in out.items():
                bad = _first_bad_example(x)
                if bad is not None:
                    raise ValueError(f"block {name!r}: non-finite value (NaN or inf) in example {bad}")
        self._blocks = out
        self._factors = None
        if factors is not None:
            self._factors = check_factors(factors, {k: v.shape[1] for k, v in out.items()})

    @property
    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """Kronecker factors block -> (A, S) (float64, CPU; METHODS.md §11), or None when not captured."""
        return None if self._factors is None else dict(self._factors)

    # ----------------------------------------------------------------------------------- basics
    @property
    def n(self) -> int:
        """Number of examples."""
        return next(iter(self._blocks.values())).shape[0]

    @property
    def names(self) -> list[str]:
        """Block names, in storage order."""
        return list(self._blocks)

    @property
    def dims(self) -> dict[str, int]:
        """Width ``d_l`` of each block."""
        return {k: v.shape[1] for k, v in self._blocks.items()}

    @property
    def dim(self) -> int:
        """Total dimension ``D = Σ d_l``."""
        return sum(v.shape[1] for v in self._blocks.values())

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the blocks (the widest one if they differ)."""
        dts = {v.dtype for v in self._blocks.values()}
        if len(dts) == 1:
            return dts.pop()
        return max(dts, key=lambda d: torch.finfo(d).bits)

    @property
    def device(self) -> torch.device:
        return next(iter(self._blocks.values())).device

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._blocks[name]
        except KeyError:
            raise KeyError(f"no block named {name!r}; blocks are {self.names}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._blocks

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[str]:
        return iter(self._blocks)

    def items(self):
        return self._blocks.items()

    def blocks(self) -> dict[str, torch.Tensor]:
        """A shallow copy of the name -> (n, d_l) mapping."""
        return dict(self._blocks)

    def __repr__(self) -> str:
        return (
            f"GradientSet(n={self.n}, blocks={len(self._blocks)}, dim={self.dim}, dtype={self.dtype}, "
            f"device={self.device})"
        )

    # --------------------------------------------------------------------------- conversions
    def matrix(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """All blocks concatenated along the feature axis, in ``names`` order: ``(n, D)``."""
        xs = [v if dtype is None else v.to(dtype) for v in self._blocks.values()]
        return xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> GradientSet:
        """Copy to another device and/or floating dtype (no copy when nothing changes)."""
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"GradientSet.to: dtype must be floating, got {dtype}")
        return GradientSet(
            {k: v.to(device=device, dtype=dtype) for k, v in self._blocks.items()},
            validate=False,
            factors=self.factors,
        )

    def subset(self, index: IndexLike) -> GradientSet:
        """Examples selected by ``index`` (slice, int, sequence of ints, or bool/long tensor)."""
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        elif not isinstance(index, slice):
            index = torch.as_tensor(index, device=self.device)
            if index.dtype == torch.bool:
                if index.shape != (self.n,):
                    raise ValueError(f"boolean index must have shape ({self.n},), got {tuple(index.shape)}")
            elif index.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
                raise TypeError(f"subset index must be integers or booleans, got {index.dtype}")
        out = {k: v[index] for k, v in self._blocks.items()}
        return GradientSet(out, validate=False)

    def iter_chunks(self, size: int, *, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, GradientSet]]:
        """Rows ``[start, stop)`` (default: all) in chunks of ``size`` rows: yields ``(offset, chunk)``
        with ``chunk`` holding rows ``offset .. offset + len(chunk)``, the last chunk possibly shorter.

        The chunks are views (slices) of the blocks: no copy. The same method on a
        :class:`~fastinf.gradients.store.GradientStore` reads the rows from disk, so estimators can
        stream over either.

        Raises:
            ValueError: ``size`` < 1, or not ``0 <= start <= stop <= n``.
        """
        start, stop = chunk_range(self.n, size, start, stop)
        for s in range(start, stop, size):
            e = min(s + size, stop)
            yield s, GradientSet({k: v[s:e] for k, v in self._blocks.items()}, validate=False)

    def select(self, names: Sequence[str]) -> GradientSet:
        """The named blocks, in the given order."""
        missing = [k for k in names if k not in self._blocks]
        if missing:
            raise KeyError(f"blocks {missing} not in this GradientSet (blocks are {self.names})")
        f = self.factors
        return GradientSet(
            {k: self._blocks[k] for k in names},
            validate=False,
            factors=None if f is None else {k: f[k] for k in names if k in f},
        )

    def mean(self) -> GradientSet:
        """The mean gradient over examples as a one-example set (v̄ of METHODS.md §0)."""
        return GradientSet({k: v.mean(dim=0, keepdim=True) for k, v in self._blocks.items()}, validate=False)

    def sq_norms(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Per-block squared norms of every example: name -> (n,)."""
        return {
            k: torch.linalg.vector_norm(v if dtype is None else v.to(dtype), dim=1).square()
            for k, v in self._blocks.items()
        }

    def to_dicts(self, shapes: Mapping[str, Sequence[int]] | None = None) -> list[dict[str, torch.Tensor]]:
        """One dict of tensors per example (inverse of :meth:`from_dicts`); ``shapes`` restores 2-D shapes."""
        shapes = shapes or {}
        return [
            {k: v[i].reshape(tuple(shapes[k])) if k in shapes else v[i] for k, v in self._blocks.items()}
            for i in range(self.n)
        ]

    @classmethod
    def from_matrix(cls, x: torch.Tensor, name: str = "all", *, validate: bool = True) -> GradientSet:
        """A one-block set from an ``(n, D)`` matrix."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"from_matrix expects a tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"from_matrix expects an (n, D) matrix, got shape {tuple(x.shape)}")
        return cls({name: x}, validate=validate)

    @classmethod
    def from_dicts(
        cls,
        per_example: Sequence[Mapping[str, torch.Tensor]] | Mapping[object, Mapping[str, torch.Tensor]],
        *,
        dtype: torch.dtype | None = None,
        validate: bool = True,
    ) -> GradientSet:
        """Build from the reference repositories' layout: one dict ``{param_name: tensor}`` per example.

        ``per_example`` is a sequence of dicts, or a mapping ``{example_id: dict}`` (DataInf/RRInf's
        ``tr_grad_dict``); integer ids are taken in ascending order. Each tensor is flattened
        row-major (a 2-D ``(r, d)`` gradient becomes ``r·d`` entries, row after row).
        """
        if isinstance(per_example, Mapping):
            keys = list(per_example.keys())
            if all(isinstance(k, int) for k in keys):
                keys = sorted(keys)
            items = [(k, per_example[k]) for k in keys]
        else:
            items = list(enumerate(per_example))
        if not items:
            raise ValueError("from_dicts: no examples given")
        ref_id, ref = items[0]
        if not isinstance(ref, Mapping) or len(ref) == 0:
            raise ValueError(f"from_dicts: example {ref_id!r} is not a non-empty dict of tensors")
        names = list(ref.keys())
        shapes = {k: tuple(torch.as_tensor(ref[k]).shape) for k in names}
        cols: dict[str, list[torch.Tensor]] = {k: [] for k in names}
        for ex_id, d in items:
            if not isinstance(d, Mapping) or set(d.keys()) != set(names):
                raise ValueError(
                    f"from_dicts: example {ex_id!r} has blocks {sorted(d.keys()) if isinstance(d, Mapping) else d!r}, "
                    f"expected {sorted(names)}"
                )
            for k in names:
                t = d[k]
                if not isinstance(t, torch.Tensor):
                    t = torch.as_tensor(t)
                if tuple(t.shape) != shapes[k]:
                    raise ValueError(
                        f"from_dicts: example {ex_id!r} block {k!r} has shape {tuple(t.shape)}, expected {shapes[k]}"
                    )
                cols[k].append(t.reshape(-1))
        blocks = {k: torch.stack(v) for k, v in cols.items()}
        if dtype is not None:
            blocks = {k: v.to(dtype) for k, v in blocks.items()}
        return cls(blocks, validate=validate)


def align_test(train: GradientSet, test: GradientSet, *, what: str = "test") -> GradientSet:
    """Return ``test`` with its blocks in ``train``'s order, after checking names and widths match."""
    if not isinstance(test, GradientSet):
        raise TypeError(f"{what} must be a GradientSet, got {type(test).__name__}")
    tn, sn = set(train.names), set(test.names)
    if tn != sn:
        missing, extra = sorted(tn - sn), sorted(sn - tn)
        raise ValueError(f"{what} blocks do not match the training blocks: missing {missing}, unexpected {extra}")
    bad = [(k, train.dims[k], test.dims[k]) for k in train.names if train.dims[k] != test.dims[k]]
    if bad:
        k, a, b = bad[0]
        raise ValueError(f"{what} block {k!r} has width {b} but the training block has width {a}")
    if test.names == train.names:
        return test
    return test.select(train.names)
