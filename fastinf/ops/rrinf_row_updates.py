"""RRInf's multi-test normalised SGD on Ω, given the rows drawn for every step (METHODS.md §5).

For each step t (rows grouped ``batch_size`` at a time):
  E = φᵀΩ − υ  (1 × m),  Ω ← Ω − lr (2 φ E / ‖φ‖² + 2 reg Ω),
the row term averaged over the non-zero rows of the step's batch. Zero rows (‖φ‖ = 0) are skipped:
a step whose rows are all zero leaves Ω unchanged (regularisation included).
"""

from __future__ import annotations

import torch

from ._dispatch import select

__all__ = ["rrinf_row_updates", "rrinf_row_updates_reference"]


def _check(
    rows: torch.Tensor,
    targets: torch.Tensor,
    omega: torch.Tensor,
    lr: float | torch.Tensor,
    reg: float,
    batch_size: int,
):
    if rows.dim() != 2 or targets.dim() != 2 or omega.dim() != 2:
        raise ValueError(
            "rrinf_row_updates: rows (T, n), targets (T, m) and omega (n, m) must be 2-D, got "
            f"{tuple(rows.shape)}, {tuple(targets.shape)}, {tuple(omega.shape)}"
        )
    if rows.shape[0] != targets.shape[0]:
        raise ValueError(f"rrinf_row_updates: {rows.shape[0]} rows but {targets.shape[0]} targets")
    if omega.shape != (rows.shape[1], targets.shape[1]):
        raise ValueError(
            f"rrinf_row_updates: omega must be ({rows.shape[1]}, {targets.shape[1]}), got {tuple(omega.shape)}"
        )
    if batch_size < 1 or rows.shape[0] % batch_size:
        raise ValueError(f"rrinf_row_updates: T={rows.shape[0]} is not a positive multiple of batch_size={batch_size}")
    lr = float(lr.max()) if isinstance(lr, torch.Tensor) else float(lr)  # per-step rates: the largest
    if lr <= 0 or reg < 0:
        raise ValueError(f"rrinf_row_updates: need lr > 0 and reg >= 0, got lr={lr}, reg={reg}")


def rrinf_row_updates_reference(
    rows: torch.Tensor,
    targets: torch.Tensor,
    omega: torch.Tensor,
    lr: float | torch.Tensor,
    reg: float,
    batch_size: int = 1,
) -> torch.Tensor:
    """PyTorch reference; returns the updated Ω (a new tensor, input untouched).

    ``lr`` may be a float or a (T / batch_size,) tensor of per-step learning rates.
    Computes in at least float32.
    """
    _check(rows, targets, omega, lr, reg, batch_size)
    dt = torch.promote_types(torch.promote_types(omega.dtype, rows.dtype), torch.float32)
    steps = rows.shape[0] // batch_size
    R = rows.to(dt).reshape(steps, batch_size, -1)  # (S, b, n)
    Y = targets.to(dt).reshape(steps, batch_size, -1)  # (S, b, m)
    nsq = R.pow(2).sum(-1)  # (S, b)
    nz = nsq > 0
    inv = torch.where(nz, 1.0 / torch.where(nz, nsq, torch.ones_like(nsq)), torch.zeros_like(nsq))
    count = nz.sum(-1)  # (S,)
    if isinstance(lr, torch.Tensor):
        lrs = lr.to(dt).reshape(-1).tolist()
        if len(lrs) != steps:
            raise ValueError(f"rrinf_row_updates: lr has {len(lrs)} entries for {steps} steps")
    else:
        lrs = [float(lr)] * steps
    W = omega.to(dt).clone()
    counts = count.tolist()
    for s in range(steps):
        c = counts[s]
        if c == 0:
            continue
        r = R[s]
        E = r @ W - Y[s]  # (b, m)
        # mean over non-zero rows of 2 φ E / ‖φ‖²; zero rows have inv = 0 and drop out
        upd = (r.T * (inv[s] * (2.0 / c))) @ E  # (n, m)
        if reg:
            upd.add_(W, alpha=2.0 * reg)
        W.sub_(upd, alpha=lrs[s])
    return W


def rrinf_row_updates(
    rows: torch.Tensor,
    targets: torch.Tensor,
    omega: torch.Tensor,
    lr: float | torch.Tensor,
    reg: float,
    batch_size: int = 1,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Dispatching version of :func:`rrinf_row_updates_reference` (same contract).

    ``backend``: ``"auto"`` (the route of ``fastinf.ops._dispatch.DISPATCH_TABLE``), ``"cuda"``, ``"triton"``
    or ``"torch"``.
    The kernels run all steps in one launch; Ω is kept in float32 on chip (float64 runs on the reference).
    """
    _check(rows, targets, omega, lr, reg, batch_size)
    _, fn = select("rrinf_row_updates", backend, omega.device, (rows, targets, omega, lr, reg, batch_size))
    return fn(rows, targets, omega, lr, reg, batch_size)
