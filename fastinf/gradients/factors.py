"""Kronecker factors of LoRA blocks (METHODS.md §11): the sums the capture hooks accumulate, their
place in :class:`~fastinf.gradients.store.GradientStore` shards, and the normalised pairs (A, S) that
:class:`~fastinf.estimators.kfac.KFAC` / ``EKFAC`` use.

A block ``l`` of shape (d_out × d_in) — ``lora_A`` (r × d_in), ``lora_B`` (d_out × r), a
``modules_to_save`` Linear weight, or a bias (d_out × 1) — has per-example gradient
G_i = Σ_s δ_is x_isᵀ (the block's row, flattened row-major). Its factors are

    A_l = (1/N_tok) Σ_{i,s} x_is x_isᵀ   (d_in × d_in),     S_l = (1/n) Σ_{i,s} δ_is δ_isᵀ   (d_out × d_out),

summed over the non-padding tokens (attention mask) of the n examples. The capture keeps the raw sums
``xx = Σ x xᵀ``, ``dd = Σ δ δᵀ`` and ``tokens = N_tok`` per block (float64), so sums of batches, shards
and ranks add exactly; :func:`normalise` divides at the end.

Storage: a store captured with factors holds, in every shard file, three extra float64 tensors per
block — ``factors/<block>/xx`` (d_in, d_in), ``factors/<block>/dd`` (d_out, d_out) and
``factors/<block>/tokens`` (1, 1) — the sums over that shard's batches. They are covered by the
shard's size and SHA-256 like its rows, resumed, repaired and merged (distributed capture) with it,
and :attr:`GradientStore.factors` adds them up. Cost: Σ_l 8 (d_in² + d_out²) bytes per shard.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

__all__ = ["FACTOR_PREFIX", "add_sums", "check_factors", "normalise", "sums_from_tensors", "sums_to_tensors"]

FACTOR_PREFIX = "factors/"
_PARTS = ("xx", "dd", "tokens")

Sums = dict[str, dict[str, torch.Tensor]]  # block -> {"xx", "dd", "tokens"} float64 CPU


def add_sums(acc: Sums | None, new: Sums | None) -> Sums | None:
    """``acc + new`` block by block (new tensors; neither argument is modified). None is zero."""
    if new is None:
        return acc
    if acc is None:
        return {k: {p: v[p].clone() for p in _PARTS} for k, v in new.items()}
    if set(acc) != set(new):
        raise ValueError(f"factor sums of different blocks: {sorted(set(acc) ^ set(new))}")
    return {k: {p: acc[k][p] + new[k][p] for p in _PARTS} for k in acc}


def total(parts: Iterable[Sums | None]) -> Sums | None:
    """The sum of several factor sums, added in the given order (deterministic bits)."""
    out = None
    for p in parts:
        out = add_sums(out, p)
    return out


def sums_to_tensors(sums: Sums) -> dict[str, torch.Tensor]:
    """Shard tensors ``factors/<block>/{xx,dd,tokens}`` (float64, contiguous, CPU)."""
    return {
        f"{FACTOR_PREFIX}{k}/{p}": v[p].detach().to("cpu", torch.float64).reshape(v[p].shape[0], -1).contiguous()
        for k, v in sums.items()
        for p in _PARTS
    }


def sums_from_tensors(tensors: Mapping[str, torch.Tensor], names: Iterable[str]) -> Sums:
    """Inverse of :func:`sums_to_tensors` for the blocks ``names`` (KeyError naming a missing tensor)."""
    return {k: {p: tensors[f"{FACTOR_PREFIX}{k}/{p}"].to(torch.float64) for p in _PARTS} for k in names}


def read_shard_sums(path, names: Iterable[str], error: type[Exception] = ValueError) -> Sums:
    """The factor sums a shard file holds (``error`` naming the file when it cannot be read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return sums_from_tensors({k: f.get_tensor(k) for k in f.keys() if k.startswith(FACTOR_PREFIX)}, names)
    except Exception as ex:  # safetensors raises several types on corrupt files; KeyError: a missing factor
        raise error(f"{path}: cannot read the Kronecker factors ({type(ex).__name__}: {ex})") from None


def normalise(sums: Sums, n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """block -> (A, S) = (xx / N_tok, dd / n), float64 (A = 0 for a block that saw no token)."""
    out = {}
    for k, v in sums.items():
        tok = float(v["tokens"].reshape(-1)[0])
        out[k] = (v["xx"] / max(tok, 1.0), v["dd"] / max(int(n), 1))
    return out


def check_factors(
    factors: Mapping[str, object], dims: Mapping[str, int], *, what: str = "factors", partial: bool = True
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Validate a mapping block -> (A, S): square, finite, A.shape[0]·S.shape[0] = the block's width.
    Returns them as float64 CPU tensors. ``partial=False`` also requires every block of ``dims``.

    Raises:
        TypeError: not a mapping of pairs of tensors.
        ValueError: an unknown block, a non-square or non-finite factor, sizes that do not multiply
            to the block's width (names the block), or (``partial=False``) a missing block.
    """
    if not isinstance(factors, Mapping):
        raise TypeError(f"{what} must be a mapping block name -> (A, S), got {type(factors).__name__}")
    out = {}
    for k, pair in factors.items():
        if k not in dims:
            raise ValueError(f"{what}: {k!r} is not a block of the gradients (blocks are {list(dims)})")
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise TypeError(f"{what}[{k!r}] must be a pair (A, S) of square tensors")
        A, S = (torch.as_tensor(t) for t in pair)
        for nm, t in (("A", A), ("S", S)):
            if t.dim() != 2 or t.shape[0] != t.shape[1] or t.shape[0] == 0:
                raise ValueError(f"{what}[{k!r}]: {nm} must be a non-empty square matrix, got shape {tuple(t.shape)}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{what}[{k!r}]: {nm} has a non-finite entry")
        if A.shape[0] * S.shape[0] != dims[k]:
            raise ValueError(
                f"{what}[{k!r}]: A is {A.shape[0]}×{A.shape[0]} and S {S.shape[0]}×{S.shape[0]}, but the block has "
                f"width {dims[k]} ≠ {A.shape[0]}·{S.shape[0]} (the row is G = δ xᵀ, (d_out × d_in) row-major)"
            )
        out[k] = (A.detach().to("cpu", torch.float64), S.detach().to("cpu", torch.float64))
    if not partial:
        missing = [k for k in dims if k not in out]
        if missing:
            raise ValueError(f"{what}: no factors for block {missing[0]!r} ({len(missing)} block(s) missing)")
    return out


def token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(N, K, d) -> the (T, d) rows of the non-padding tokens: ``mask`` (N, K) applies when its K
    matches (a pooled input, K = 1, or a convolution's positions keep every row)."""
    rows = x.reshape(-1, x.shape[-1])
    if mask is not None and mask.dim() == 2 and x.dim() == 3 and mask.shape == x.shape[:2] and x.shape[1] > 1:
        rows = rows[mask.reshape(-1).to(device=x.device) != 0]
    return rows


def cov(rows: torch.Tensor) -> torch.Tensor:
    """rowsᵀ rows in float32 or wider (float64 result on the rows' device)."""
    dt = torch.promote_types(rows.dtype, torch.float32)
    r = rows.to(dt)
    return (r.T @ r).to(torch.float64)


def block_sums(
    x_rows: torch.Tensor | None,
    d_rows: torch.Tensor,
    tokens: int,
    dd: torch.Tensor | None = None,
    xx: torch.Tensor | None = None,
):
    """One call's sums of a block: input rows (None: a bias, input 1), output-gradient rows (``xx`` /
    ``dd``: their covariances when already computed for another block of the same input / output)."""
    if xx is None:
        xx = cov(x_rows) if x_rows is not None else torch.full((1, 1), float(tokens), dtype=torch.float64)
    return {"xx": xx, "dd": cov(d_rows) if dd is None else dd, "tokens": torch.full((1, 1), float(tokens))}


def accumulate(acc: Sums, name: str, part: dict[str, torch.Tensor]) -> None:
    """acc[name] += part (in place; float64 CPU)."""
    part = {p: v.detach().to("cpu", torch.float64) for p, v in part.items()}
    if name not in acc:
        part = {p: v.clone() for p, v in part.items()}  # never alias a tensor another block shares
        acc[name] = part
    else:
        for p in _PARTS:
            acc[name][p] += part[p]


def is_finite_sums(sums: Sums) -> str | None:
    """The first block whose sums are not finite, or None."""
    for k, v in sums.items():
        if not all(math.isfinite(float(v[p].sum())) for p in _PARTS):
            return k
    return None
